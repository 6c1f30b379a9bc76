//! Parity of the training module with candle-transformers' inference models on tiny random
//! checkpoints: full-sequence logits vs their last-position logits and vs their KV-cached
//! step-by-step decoding at every position; and our own KV cache vs our full forward.
//! Tolerance: max |ours − theirs| ≤ 1e-4 · max |theirs|.

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use tangle::model::config::ModelFamily;
use tangle::model::fixture::{write_tiny_model, FixtureSpec};
use tangle::model::loading::{load_model, load_weights, FinetuneMode};
use tangle::model::qwen::KvCache;

const TOLERANCE: f32 = 1e-4;

fn relative_error(ours: &Tensor, theirs: &Tensor) -> f32 {
    let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let theirs = theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(ours.len(), theirs.len());
    let scale = theirs.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = ours.iter().zip(&theirs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

fn token_ids(len: usize, vocab: usize, seed: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97) >> 7) % vocab as u32).collect()
}

/// Logits from the reference model: (last-position logits of one full call, per-position
/// logits of step-by-step cached decoding).
trait Reference {
    fn last_logits(&mut self, ids: &Tensor) -> Tensor;
    fn step(&mut self, id: &Tensor, offset: usize) -> Tensor;
    fn reset(&mut self);
}

struct Qwen2Ref(candle_transformers::models::qwen2::ModelForCausalLM);
impl Reference for Qwen2Ref {
    fn last_logits(&mut self, ids: &Tensor) -> Tensor {
        self.0.forward(ids, 0).unwrap()
    }
    fn step(&mut self, id: &Tensor, offset: usize) -> Tensor {
        self.0.forward(id, offset).unwrap()
    }
    fn reset(&mut self) {
        self.0.clear_kv_cache()
    }
}

struct Qwen3Ref(candle_transformers::models::qwen3::ModelForCausalLM);
impl Reference for Qwen3Ref {
    fn last_logits(&mut self, ids: &Tensor) -> Tensor {
        self.0.forward(ids, 0).unwrap()
    }
    fn step(&mut self, id: &Tensor, offset: usize) -> Tensor {
        self.0.forward(id, offset).unwrap()
    }
    fn reset(&mut self) {
        self.0.clear_kv_cache()
    }
}

fn check_parity(family: ModelFamily, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_tiny_model(dir.path(), &FixtureSpec::tiny(family, seed)).unwrap();
    let device = Device::Cpu;
    let ours = load_model(dir.path().to_str().unwrap(), &FinetuneMode::Frozen, 0, &device).unwrap();
    let config_text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let weights = load_weights(dir.path(), &device).unwrap();
    let vb = VarBuilder::from_tensors(weights, DType::F32, &device);
    let mut reference: Box<dyn Reference> = match family {
        ModelFamily::Qwen2 => {
            let cfg: candle_transformers::models::qwen2::Config = serde_json::from_str(&config_text).unwrap();
            Box::new(Qwen2Ref(candle_transformers::models::qwen2::ModelForCausalLM::new(&cfg, vb).unwrap()))
        }
        ModelFamily::Qwen3 => {
            let cfg: candle_transformers::models::qwen3::Config = serde_json::from_str(&config_text).unwrap();
            Box::new(Qwen3Ref(candle_transformers::models::qwen3::ModelForCausalLM::new(&cfg, vb).unwrap()))
        }
        ModelFamily::Llama => unreachable!("no llama reference here"),
    };
    let len = 13;
    let ids = token_ids(len, 259, seed as u32);
    let input = Tensor::from_slice(&ids, (1, len), &device).unwrap();
    let full = ours.model.forward(&input, None).unwrap(); // (1, len, vocab)
    assert_eq!(full.dims(), &[1, len, config.vocab_size]);

    let last = reference.last_logits(&input); // (1, 1, vocab)
    let err = relative_error(&full.i((.., len - 1..len, ..)).unwrap(), &last);
    assert!(err <= TOLERANCE, "{family:?} last-position logits differ: {err}");

    reference.reset();
    for position in 0..len {
        let step_input = input.i((.., position..position + 1)).unwrap();
        let theirs = reference.step(&step_input, position);
        let err = relative_error(&full.i((.., position..position + 1, ..)).unwrap(), &theirs);
        assert!(err <= TOLERANCE, "{family:?} position {position} differs from cached decoding: {err}");
    }
}

#[test]
fn parity_qwen2_full_sequence_matches_candle_transformers() {
    check_parity(ModelFamily::Qwen2, 11);
}

#[test]
fn parity_qwen3_full_sequence_matches_candle_transformers() {
    check_parity(ModelFamily::Qwen3, 12);
}

/// Our KV-cached decode (prefill of 5, then chunks of 1 and 3) equals our full forward.
#[test]
fn parity_own_kv_cache_matches_full_forward_all_families() {
    for (family, seed) in [(ModelFamily::Qwen2, 1), (ModelFamily::Qwen3, 2), (ModelFamily::Llama, 3)] {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), &FixtureSpec::tiny(family, seed)).unwrap();
        let device = Device::Cpu;
        let loaded = load_model(dir.path().to_str().unwrap(), &FinetuneMode::Frozen, 0, &device).unwrap();
        let len = 12;
        let ids = token_ids(len, 259, seed as u32);
        let input = Tensor::from_slice(&ids, (1, len), &device).unwrap();
        let full = loaded.model.forward(&input, None).unwrap();
        let mut cache = KvCache::new();
        let mut start = 0;
        for chunk in [5, 1, 3, 1, 2] {
            let part = input.i((.., start..start + chunk)).unwrap();
            let logits = loaded.model.forward_cached(&part, &mut cache).unwrap();
            let err = relative_error(&logits, &full.i((.., start..start + chunk, ..)).unwrap());
            assert!(err <= TOLERANCE, "{family:?} chunk at {start}: {err}");
            start += chunk;
        }
        assert_eq!(cache.len(), len);
    }
}

/// A right-padded batch gives each sequence the logits it gets alone, and `logits_at` picks
/// exactly the requested rows.
#[test]
fn parity_padded_batch_and_selected_rows_match_single_sequences() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), &FixtureSpec::tiny(ModelFamily::Qwen2, 5)).unwrap();
    let device = Device::Cpu;
    let loaded = load_model(dir.path().to_str().unwrap(), &FinetuneMode::Frozen, 0, &device).unwrap();
    let long = token_ids(10, 259, 1);
    let short = token_ids(6, 259, 2);
    let mut padded = short.clone();
    padded.resize(10, 0);
    let batch_ids: Vec<u32> = long.iter().chain(&padded).copied().collect();
    let batch = Tensor::from_vec(batch_ids, (2, 10), &device).unwrap();
    let padding = vec![vec![1u32; 10], [vec![1u32; 6], vec![0u32; 4]].concat()];
    let batch_logits = loaded.model.forward(&batch, Some(&padding)).unwrap();
    let alone = loaded.model.forward(&Tensor::from_slice(&short, (1, 6), &device).unwrap(), None).unwrap();
    let err = relative_error(&batch_logits.i((1..2, 0..6, ..)).unwrap(), &alone);
    assert!(err <= TOLERANCE, "padded row differs: {err}");

    let hidden = loaded.model.forward_hidden(&batch, Some(&padding), None).unwrap();
    let rows = [3u32, 12, 15];
    let selected = loaded.model.logits_at(&hidden, &rows).unwrap();
    let all = batch_logits.reshape((20, ())).unwrap();
    for (k, &row) in rows.iter().enumerate() {
        let err = relative_error(&selected.i(k).unwrap(), &all.i(row as usize).unwrap());
        assert!(err <= 1e-6, "row {row}: {err}");
    }
}

/// Llama (untied lm_head, llama3 rope scaling with a small original context so every branch
/// of the frequency adjustment is used) against candle-transformers' llama.
#[test]
fn parity_llama_with_rope_scaling_matches_candle_transformers() {
    use candle_transformers::models::llama;
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), &FixtureSpec::tiny(ModelFamily::Llama, 13)).unwrap();
    let config_path = dir.path().join("config.json");
    let mut config_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config_json["rope_scaling"] = serde_json::json!({
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64
    });
    std::fs::write(&config_path, config_json.to_string()).unwrap();
    let device = Device::Cpu;
    let ours = load_model(dir.path().to_str().unwrap(), &FinetuneMode::Frozen, 0, &device).unwrap();
    assert!(ours.config.llama3_rope_scaling().is_some());
    let reference_config: llama::LlamaConfig = serde_json::from_value(config_json).unwrap();
    let reference_config = reference_config.into_config(false);
    let weights = load_weights(dir.path(), &device).unwrap();
    let vb = VarBuilder::from_tensors(weights, DType::F32, &device);
    let reference = llama::Llama::load(vb, &reference_config).unwrap();
    let len = 11;
    let ids = token_ids(len, 259, 13);
    let input = Tensor::from_slice(&ids, (1, len), &device).unwrap();
    let full = ours.model.forward(&input, None).unwrap();
    let mut cache = llama::Cache::new(false, DType::F32, &reference_config, &device).unwrap();
    let last = reference.forward(&input, 0, &mut cache).unwrap();
    let err = relative_error(&full.i((0, len - 1)).unwrap(), &last.i(0).unwrap());
    assert!(err <= TOLERANCE, "llama last-position logits differ: {err}");
    let mut cache = llama::Cache::new(true, DType::F32, &reference_config, &device).unwrap();
    for position in 0..len {
        let step = reference.forward(&input.i((.., position..position + 1)).unwrap(), position, &mut cache).unwrap();
        let err = relative_error(&full.i((0, position)).unwrap(), &step.i(0).unwrap());
        assert!(err <= TOLERANCE, "llama position {position}: {err}");
    }
}
