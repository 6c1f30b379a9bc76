//! The inference engine on tiny random Qwen2 models (f32 and Q8_0 GGUFs written here):
//! batched generation gives each request exactly its tokens alone, whatever arrives when;
//! prefix-cache hits give the tokens of misses; prompt scores equal the f32 model's own
//! full-sequence log-softmax; seeded sampling repeats inside a batch; `n` choices; grammars
//! always hold; a full queue refuses; abandoned requests free their KV.

use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tangle::model::config::ModelFamily;
use tangle::model::engine::{
    Engine, EngineOptions, Event, FinishReason, GenerationRequest, Grammar, ModelSource, Sampling, SubmitError,
};
use tangle::model::fixture::{write_tiny_model, FixtureSpec};
use tangle::model::gguf_export::{export_dir, QuantFormat};
use tangle::model::loading::{load_model, FinetuneMode};

/// A tiny Qwen2 directory and its GGUF in `format`.
fn model(root: &Path, format: QuantFormat, seed: u64) -> (PathBuf, PathBuf) {
    let dir = root.join(format!("model-{seed}"));
    if !dir.join("config.json").is_file() {
        write_tiny_model(&dir, &FixtureSpec::tiny(ModelFamily::Qwen2, seed)).unwrap();
    }
    let gguf = dir.join(format.file_name());
    let template = tangle::model::chat::chat_template(None);
    export_dir(&dir, &gguf, format, "tiny", &template).unwrap();
    (dir, gguf)
}

fn start(dir: &Path, gguf: &Path, options: EngineOptions) -> Engine {
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let source = ModelSource { id: "tiny".into(), gguf: gguf.to_path_buf(), tokenizer, default_system: None };
    Engine::start(source, options).unwrap()
}

fn prompt(engine: &Engine, system: &str, user: &str) -> Vec<u32> {
    engine.info().encode_chat(&[("system".into(), system.into()), ("user".into(), user.into())]).unwrap()
}

/// What one request produced: its tokens per choice and how each ended.
#[derive(Debug, Clone, PartialEq, Default)]
struct Outcome {
    tokens: Vec<Vec<u32>>,
    texts: Vec<String>,
    finish: Vec<Option<FinishReason>>,
    prompt_scores: Option<Vec<Option<f32>>>,
}

fn drain(mut events: tokio::sync::mpsc::UnboundedReceiver<Event>, n: usize) -> Outcome {
    let mut out = Outcome {
        tokens: vec![Vec::new(); n],
        texts: vec![String::new(); n],
        finish: vec![None; n],
        ..Default::default()
    };
    let mut open = n;
    while open > 0 {
        match events.blocking_recv().expect("the engine stopped") {
            Event::Token { choice, token, piece, .. } => {
                out.tokens[choice as usize].push(token);
                out.texts[choice as usize].push_str(&piece);
            }
            Event::Finished { choice, finish, text_tail, .. } => {
                out.texts[choice as usize].push_str(&text_tail);
                out.finish[choice as usize] = Some(finish);
                open -= 1;
            }
            Event::Prompt(scores) => {
                out.prompt_scores = Some(scores.iter().map(|s| s.as_ref().map(|s| s.logprob)).collect())
            }
            Event::Failed(m) => panic!("generation failed: {m}"),
        }
    }
    out
}

fn alone(engine: &Engine, request: GenerationRequest) -> Outcome {
    let n = request.n as usize;
    drain(engine.submit(request).unwrap(), n)
}

const USERS: [&str; 8] = [
    "label apple",
    "label river",
    "copy the word stone",
    "where is my parcel",
    "the api returns errors",
    "label apple tree",
    "refund please",
    "stock counts are wrong",
];

/// Requests submitted together and in waves (some join while others decode) give each one
/// exactly the greedy tokens it gives alone.
fn batched_equals_alone(format: QuantFormat) {
    let root = tempfile::tempdir().unwrap();
    let (dir, gguf) = model(root.path(), format, 3);
    let solo = start(&dir, &gguf, EngineOptions { max_running: 1, prefix_entries: 0, ..EngineOptions::default() });
    let requests: Vec<GenerationRequest> = USERS
        .iter()
        .enumerate()
        .map(|(i, u)| GenerationRequest::greedy(prompt(&solo, "Answer with one label.", u), 6 + i as u32 * 3))
        .collect();
    let expected: Vec<Outcome> = requests.iter().map(|r| alone(&solo, r.clone())).collect();
    assert!(expected.iter().any(|o| o.tokens[0].len() > 3), "the model must generate something to compare");
    drop(solo);

    let batched = start(&dir, &gguf, EngineOptions { max_running: 8, ..EngineOptions::default() });
    // Wave 1: half at once; wave 2 joins a few steps later, while wave 1 decodes.
    let first: Vec<_> = requests[..4].iter().map(|r| batched.submit(r.clone()).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(15));
    let second: Vec<_> = requests[4..].iter().map(|r| batched.submit(r.clone()).unwrap()).collect();
    let got: Vec<Outcome> = first.into_iter().chain(second).map(|rx| drain(rx, 1)).collect();
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g.tokens, e.tokens, "{format:?} request {i} ({:?})", USERS[i]);
        assert_eq!(g.texts, e.texts);
        assert_eq!(g.finish, e.finish);
    }
    assert!(batched.metrics().steps_total.load(Ordering::Relaxed) > 0);
}

#[test]
fn batched_generation_equals_generation_alone_f32() {
    batched_equals_alone(QuantFormat::F32);
}

#[test]
fn batched_generation_equals_generation_alone_q8_0() {
    batched_equals_alone(QuantFormat::Q8_0);
}

#[test]
fn prefix_cache_hits_give_the_tokens_of_misses() {
    let root = tempfile::tempdir().unwrap();
    let (dir, gguf) = model(root.path(), QuantFormat::Q8_0, 4);
    let cold = start(&dir, &gguf, EngineOptions { prefix_entries: 0, ..EngineOptions::default() });
    let warm = start(&dir, &gguf, EngineOptions { prefix_entries: 8, ..EngineOptions::default() });
    let system = "You route messages. Reply with exactly one word: the queue. billing shipping returns";
    for round in 0..2 {
        // Concurrent requests sharing the system prompt, some repeated exactly.
        let requests: Vec<GenerationRequest> =
            USERS.iter().chain(&USERS[..3]).map(|u| GenerationRequest::greedy(prompt(&cold, system, u), 8)).collect();
        let misses: Vec<_> = requests.iter().map(|r| cold.submit(r.clone()).unwrap()).collect();
        let hits: Vec<_> = requests.iter().map(|r| warm.submit(r.clone()).unwrap()).collect();
        for (i, (m, h)) in misses.into_iter().zip(hits).enumerate() {
            assert_eq!(drain(h, 1), drain(m, 1), "round {round}, request {i}");
        }
    }
    let stats = *warm.metrics().cache.lock().unwrap();
    assert!(stats.hits > 0 && stats.hit_tokens > stats.hits * 10, "{stats:?}");
    assert_eq!(cold.metrics().cache.lock().unwrap().hits, 0);
}

/// `prompt_logprobs` (the `echo` scoring) equals the log-softmax of candle's f32 forward
/// over the whole sequence, at every position.
#[test]
fn prompt_scores_equal_the_f32_models_log_softmax() {
    let root = tempfile::tempdir().unwrap();
    let (dir, gguf) = model(root.path(), QuantFormat::F32, 5);
    let engine = start(&dir, &gguf, EngineOptions::default());
    let ids = prompt(&engine, "Score this.", "label the river stone twice");
    let mut request = GenerationRequest::greedy(ids.clone(), 0);
    request.prompt_logprobs = Some(3);
    let scored = alone(&engine, request);
    let scores = scored.prompt_scores.expect("prompt scores");
    assert_eq!(scores.len(), ids.len());
    assert_eq!(scores[0], None, "nothing predicts the first token");
    assert_eq!(scored.finish, vec![Some(FinishReason::Length)]);
    assert!(scored.tokens[0].is_empty());

    let reference = load_model(dir.to_str().unwrap(), &FinetuneMode::Frozen, 0, &Device::Cpu).unwrap();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = reference.model.forward(&input, None).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap();
    let mut worst = 0f32;
    for (p, score) in scores.iter().enumerate().skip(1) {
        let row = &logits[p - 1];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z = max as f64 + row.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln();
        let expected = (row[ids[p] as usize] as f64 - z) as f32;
        worst = worst.max((score.unwrap() - expected).abs());
    }
    assert!(worst < 1e-4, "largest difference {worst}");
}

#[test]
fn seeded_sampling_repeats_inside_a_batch_and_n_choices_differ() {
    // Beside other traffic a seeded request repeats exactly on an f32 model, whose attention
    // is batch-independent; quantized models use flash attention, where neighbours move
    // probabilities by ~1e-3 (ARCHITECTURE.md, "The engine").
    let root = tempfile::tempdir().unwrap();
    let (dir, gguf) = model(root.path(), QuantFormat::F32, 6);
    let engine = start(&dir, &gguf, EngineOptions::default());
    let sampled = |user: &str, seed: u64, n: u32| {
        let mut r = GenerationRequest::greedy(prompt(&engine, "Write.", user), 12);
        r.sampling = Sampling { temperature: 1.0, top_p: 0.95, seed: Some(seed) };
        r.n = n;
        r
    };
    let alone_result = alone(&engine, sampled("label apple", 9, 1));
    // The same request again, now beside other traffic.
    let noise: Vec<_> = USERS.iter().map(|u| engine.submit(sampled(u, 1, 1)).unwrap()).collect();
    let again = engine.submit(sampled("label apple", 9, 1)).unwrap();
    assert_eq!(drain(again, 1).tokens, alone_result.tokens);
    noise.into_iter().for_each(|rx| drop(drain(rx, 1)));

    let three = alone(&engine, sampled("label river", 2, 3));
    assert_eq!(three.tokens.len(), 3);
    assert!(three.finish.iter().all(Option::is_some));
    assert!(three.tokens[0] != three.tokens[1] || three.tokens[1] != three.tokens[2], "{three:?}");
    assert_eq!(alone(&engine, sampled("label river", 2, 3)).tokens, three.tokens, "seeded n>1 repeats");
}

#[test]
fn grammars_always_hold_under_sampling() {
    let root = tempfile::tempdir().unwrap();
    let (dir, gguf) = model(root.path(), QuantFormat::Q8_0, 7);
    let engine = start(&dir, &gguf, EngineOptions::default());
    let schema = serde_json::json!({
        "type": "object",
        "properties": { "queue": { "enum": ["billing", "shipping"] }, "urgent": { "type": "boolean" } },
        "required": ["queue", "urgent"],
        "additionalProperties": false,
    });
    let validator = jsonschema::validator_for(&schema).unwrap();
    let choices = vec!["billing".to_string(), "shipping".to_string(), "returns".to_string()];
    let mut pending = Vec::new();
    for seed in 0..12u64 {
        for grammar in [Grammar::JsonSchema(schema.clone()), Grammar::Choice(choices.clone())] {
            let mut r = GenerationRequest::greedy(prompt(&engine, "Route.", USERS[seed as usize % 8]), 96);
            r.sampling = Sampling { temperature: 1.0, top_p: 1.0, seed: Some(seed) };
            r.grammar = Some(grammar.clone());
            pending.push((grammar, engine.submit(r).unwrap()));
        }
    }
    for (grammar, rx) in pending {
        let out = drain(rx, 1);
        assert_eq!(out.finish[0], Some(FinishReason::Stop), "{grammar:?}: {out:?}");
        match grammar {
            Grammar::JsonSchema(_) => {
                let value: serde_json::Value = serde_json::from_str(&out.texts[0]).expect(&out.texts[0]);
                assert!(validator.is_valid(&value), "{value}");
            }
            _ => assert!(choices.contains(&out.texts[0]), "{:?}", out.texts[0]),
        }
    }
    let bad = GenerationRequest {
        grammar: Some(Grammar::Regex("(unclosed".into())),
        ..GenerationRequest::greedy(vec![1, 2], 4)
    };
    assert!(matches!(engine.submit(bad), Err(SubmitError::BadRequest(_))));
}

#[test]
fn logit_bias_bans_a_token_and_checks_its_ids() {
    let root = tempfile::tempdir().unwrap();
    let (dir, gguf) = model(root.path(), QuantFormat::Q8_0, 9);
    let engine = start(&dir, &gguf, EngineOptions::default());
    let request = || GenerationRequest::greedy(prompt(&engine, "Write.", "label apple"), 6);
    let free = alone(&engine, request());
    let first = free.tokens[0][0];
    let banned = alone(&engine, GenerationRequest { logit_bias: vec![(first, -100.0)], ..request() });
    assert_ne!(banned.tokens[0][0], first, "a -100 bias bans the greedy token");
    assert!(!banned.tokens[0].contains(&first));
    let outside = GenerationRequest { logit_bias: vec![(u32::MAX, 1.0)], ..request() };
    assert!(matches!(engine.submit(outside), Err(SubmitError::BadRequest(_))));
}

#[test]
fn a_full_queue_refuses_and_abandoned_requests_free_their_kv() {
    let root = tempfile::tempdir().unwrap();
    let (dir, gguf) = model(root.path(), QuantFormat::Q8_0, 8);
    let engine = start(&dir, &gguf, EngineOptions { max_running: 2, queue: 3, ..EngineOptions::default() });
    let long = |u: &str| GenerationRequest::greedy(prompt(&engine, "Write a lot.", u), 400);
    let mut held = Vec::new();
    let mut refused = 0;
    for u in USERS {
        match engine.submit(long(u)) {
            Ok(rx) => held.push(rx),
            Err(SubmitError::Overloaded) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused > 0, "a queue of 3 behind 2 running must refuse some of 8");
    assert!(engine.metrics().rejected_total.load(Ordering::Relaxed) > 0);
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    let m = engine.metrics();
    let busy =
        || [&m.running, &m.queued, &m.kv_tokens_running, &m.kv_tokens_reserved].map(|g| g.load(Ordering::SeqCst));
    while busy() != [0; 4] {
        // running, queued, KV cells held, KV cells reserved
        assert!(Instant::now() < deadline, "abandoned requests still hold {:?}", busy());
        std::thread::sleep(Duration::from_millis(20));
    }
    // And it still answers.
    assert_eq!(alone(&engine, GenerationRequest::greedy(prompt(&engine, "a", "b"), 3)).finish.len(), 1);
}
