//! Loading from a sharded checkpoint and from a hub id through an offline HF cache built
//! here (no network). Environment variables are process-wide, so the hub test is the only
//! one in this file that touches them — and this file is its own test binary, apart from
//! `tests/it/`, so no test of another module reads them while it sets them.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use tangle::model::config::ModelFamily;
use tangle::model::fixture::{write_tiny_model, FixtureSpec};
use tangle::model::loading::{load_model, load_weights, FinetuneMode, LoadError};

fn logits(source: &str) -> Vec<f32> {
    let loaded = load_model(source, &FinetuneMode::Frozen, 0, &Device::Cpu).unwrap();
    let ids = Tensor::from_slice(&[3u32, 9, 27, 81], (1, 4), &Device::Cpu).unwrap();
    loaded.model.forward(&ids, None).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn sharded_checkpoint_loads_like_single_file() {
    let single = tempfile::tempdir().unwrap();
    write_tiny_model(single.path(), &FixtureSpec::tiny(ModelFamily::Llama, 4)).unwrap();
    let sharded = tempfile::tempdir().unwrap();
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(single.path().join(file), sharded.path().join(file)).unwrap();
    }
    let weights = load_weights(single.path(), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, members) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)]
    {
        let part: HashMap<String, Tensor> = members.iter().map(|n| ((*n).clone(), weights[*n].clone())).collect();
        candle_core::safetensors::save(&part, sharded.path().join(shard)).unwrap();
        for name in members {
            weight_map.insert((*name).clone(), serde_json::json!(shard));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(sharded.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(logits(single.path().to_str().unwrap()), logits(sharded.path().to_str().unwrap()));
}

#[test]
fn hub_id_resolves_from_offline_cache_and_reports_misses() {
    let home = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = home.path().join("hub").join("models--tangle--tiny-qwen");
    let snapshot = repo.join("snapshots").join(commit);
    write_tiny_model(&snapshot, &FixtureSpec::tiny(ModelFamily::Qwen2, 8)).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), commit).unwrap();
    // SAFETY (edition 2021: not unsafe yet): this test binary runs no other test that reads
    // these variables concurrently.
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    assert_eq!(logits("tangle/tiny-qwen"), logits(snapshot.to_str().unwrap()));
    let missing = load_model("tangle/not-cached", &FinetuneMode::Frozen, 0, &Device::Cpu);
    assert!(matches!(missing, Err(LoadError::NotCached { .. })));
}
