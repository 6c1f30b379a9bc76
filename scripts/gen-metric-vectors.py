#!/usr/bin/env python3
"""Writes tests/vectors/metrics.json: metric values computed by the reference implementations
that tangle's metrics must agree with.

- ROUGE-L: Google's `rouge-score` package, RougeScorer(["rougeL"], use_stemmer=False), F-measure.
- chrF: `sacrebleu` 2.x, CHRF() defaults (char order 6, word order 0, beta 2), sentence_score.
- token F1: the official SQuAD v2.0 evaluation script's normalize_answer/compute_f1, restated
  below from its published definition.

    pip install rouge-score sacrebleu && python3 scripts/gen-metric-vectors.py
"""
import collections
import json
import random
import re
import string
import sys

import sacrebleu
from rouge_score import rouge_scorer


def squad_normalize(s):
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(gold, pred):
    gold_toks = squad_normalize(gold).split()
    pred_toks = squad_normalize(pred).split()
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return float(gold_toks == pred_toks)
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


FIXED = [
    ("billing", "billing"),
    ("Billing", "billing"),
    ("", ""),
    ("", "shipping"),
    ("shipping", ""),
    ("the cat sat on the mat", "the cat is on the mat"),
    ("A refund was issued to your card.", "We issued a refund to the card on file."),
    ("{\"intent\": \"billing\", \"order_id\": 1234}", "{\"intent\": \"billing\", \"order_id\": \"1234\"}"),
    ("Your parcel ships tomorrow!!", "The parcel will ship tomorrow."),
    ("café au lait", "cafe au lait"),
    ("naïve résumé", "naive resume"),
    ("a b c d e f g", "g f e d c b a"),
    ("aaaaaaa", "aaa"),
    ("x", "xy"),
    ("the the the", "the"),
    ("123 456", "123456"),
    ("Tracking number: ZX-99-001", "tracking number zx 99 001"),
    ("   spaced    out   ", "spaced out"),
    ("日本語のテキスト", "日本語テキスト"),
    ("an apple a day", "apple day"),
]

WORDS = ("billing shipping refund order parcel account password store theme webhook api invoice "
         "payout the a an is was to of on for tracking card error page slow blank stock variant").split()


def random_pairs(n, seed=20261125):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ref = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        hyp_words = ref.split()
        for _ in range(rng.randint(0, 4)):
            op = rng.randint(0, 2)
            if op == 0 and hyp_words:
                hyp_words.pop(rng.randrange(len(hyp_words)))
            elif op == 1:
                hyp_words.insert(rng.randint(0, len(hyp_words)), rng.choice(WORDS))
            elif hyp_words:
                i = rng.randrange(len(hyp_words))
                hyp_words[i] = hyp_words[i].capitalize() + rng.choice([".", ",", "!", ""])
        out.append((" ".join(hyp_words), ref))
    return out


def main():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    chrf = sacrebleu.metrics.CHRF()
    vectors = []
    for hyp, ref in FIXED + random_pairs(60):
        vectors.append({
            "output": hyp,
            "reference": ref,
            "rouge_l": scorer.score(ref, hyp)["rougeL"].fmeasure,
            "chrf": chrf.sentence_score(hyp, [ref]).score / 100.0,
            "token_f1": squad_f1(ref, hyp),
        })
    doc = {
        "sources": {
            "rouge_l": "rouge-score (Google) RougeScorer(['rougeL'], use_stemmer=False).score(reference, output).fmeasure",
            "chrf": f"sacrebleu {sacrebleu.__version__} CHRF() defaults, sentence_score(output, [reference]).score / 100",
            "token_f1": "official SQuAD v2.0 evaluation script: compute_f1(reference, output)",
        },
        "vectors": vectors,
    }
    json.dump(doc, sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
