//! tangle's metrics against values computed by the reference implementations, on the shared
//! vectors in tests/vectors/metrics.json (made by scripts/gen-metric-vectors.py, which names
//! each source: rouge-score for ROUGE-L, sacrebleu for chrF, the SQuAD v2.0 script for F1).

use serde_json::Value;
use tangle::eval::metrics;

#[test]
fn metrics_agree_with_their_reference_implementations() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/metrics.json")).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let vectors = doc["vectors"].as_array().unwrap();
    assert!(vectors.len() >= 50);
    let mut checked = 0;
    for v in vectors {
        let (out, reference) = (v["output"].as_str().unwrap(), v["reference"].as_str().unwrap());
        for (name, ours) in [
            ("rouge_l", metrics::rouge_l(out, reference)),
            ("chrf", metrics::chrf(out, reference)),
            ("token_f1", metrics::token_f1(out, reference)),
        ] {
            let expected = v[name].as_f64().unwrap();
            assert!(
                (ours - expected).abs() < 1e-9,
                "{name}({out:?}, {reference:?}) = {ours}, reference implementation says {expected}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, vectors.len() * 3);
}
