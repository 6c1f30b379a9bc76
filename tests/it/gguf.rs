//! GGUF students and the GGUF teacher server, on tiny GGUF files written here: the GGUF →
//! Hugging Face conversion gives the same logits as candle-transformers' quantized Qwen2 and
//! as our serving decoder; the tokenizer rebuilt from GGUF metadata round-trips text and
//! keeps ChatML tokens whole; system-prompt KV reuse changes no output; bad files are
//! refused with the file and the reason.

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use tangle::model::config::ModelFamily;
use tangle::model::engine::{Engine, EngineOptions, Event, GenerationRequest, ModelSource};
use tangle::model::fixture::{fixture_config, random_weights, tokenizer_json, FixtureSpec};
use tangle::model::gguf_import;
use tangle::model::loading::{load_model, FinetuneMode};
use tangle::serve::{ChatModel, GenerateRequest, Message};

fn engine(gguf: &Path, prefix_entries: usize) -> Engine {
    let source = ModelSource {
        id: "tiny".into(),
        gguf: gguf.to_path_buf(),
        tokenizer: gguf_import::load_tokenizer(gguf).unwrap(),
        default_system: None,
    };
    Engine::start(source, EngineOptions { prefix_entries, ..EngineOptions::default() }).unwrap()
}

/// The engine's log-probabilities of every token after `ids`.
fn served_logprobs(gguf: &Path, ids: &[u32]) -> Vec<f32> {
    let engine = engine(gguf, 0);
    let rows = engine.info().vocab_rows;
    let mut request = GenerationRequest::greedy(ids.to_vec(), 1);
    request.logprobs = Some(rows as u32);
    let mut events = engine.submit(request).unwrap();
    while let Some(event) = events.blocking_recv() {
        if let Event::Token { logprob: Some(lp), .. } = event {
            let mut out = vec![0f32; rows];
            for (id, l) in lp.top {
                out[id as usize] = l;
            }
            return out;
        }
    }
    panic!("no token was generated");
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z = max as f64 + logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln();
    logits.iter().map(|&l| (l as f64 - z) as f32).collect()
}

const HF_TO_GGUF: [(&str, &str); 12] = [
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
];

/// Writes a tiny Qwen2 GGUF from fixture weights; matrices in `matrix_dtype`.
fn write_gguf(path: &Path, matrix_dtype: GgmlDType, arch: &str, drop_tensor: Option<&str>) {
    let mut spec = FixtureSpec::tiny(ModelFamily::Qwen2, 5);
    spec.tie_word_embeddings = false;
    let config = fixture_config(&spec);
    let weights = random_weights(&config, spec.init_std, spec.seed, &Device::Cpu).unwrap();
    let mut named: Vec<(String, Tensor)> = vec![
        ("token_embd.weight".into(), weights["model.embed_tokens.weight"].clone()),
        ("output_norm.weight".into(), weights["model.norm.weight"].clone()),
        ("output.weight".into(), weights["lm_head.weight"].clone()),
    ];
    for i in 0..config.num_hidden_layers {
        for (hf, gg) in HF_TO_GGUF {
            named.push((format!("blk.{i}.{gg}"), weights[&format!("model.layers.{i}.{hf}")].clone()));
        }
    }
    let tensors: Vec<(String, QTensor)> = named
        .into_iter()
        .filter(|(name, _)| Some(name.as_str()) != drop_tensor)
        .map(|(name, t)| {
            let dtype = if t.rank() == 2 { matrix_dtype } else { GgmlDType::F32 };
            (name, QTensor::quantize(&t, dtype).unwrap())
        })
        .collect();

    let (tokenizer, _) = tokenizer_json();
    let vocab = tokenizer["model"]["vocab"].as_object().unwrap();
    let mut tokens: Vec<(usize, String, i32)> =
        vocab.iter().map(|(t, id)| (id.as_u64().unwrap() as usize, t.clone(), 1)).collect();
    for added in tokenizer["added_tokens"].as_array().unwrap() {
        tokens.push((added["id"].as_u64().unwrap() as usize, added["content"].as_str().unwrap().into(), 3));
    }
    tokens.sort();
    // The embedding matrix is padded past the tokenizer, as Qwen's is.
    while tokens.len() < config.vocab_size {
        tokens.push((tokens.len(), format!("<|pad_{}|>", tokens.len()), 3));
    }
    let merges: Vec<gguf_file::Value> = tokenizer["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| gguf_file::Value::String(m.as_str().unwrap().into()))
        .collect();
    use gguf_file::Value as V;
    let eos = tokens.iter().find(|t| t.1 == "<|im_end|>").unwrap().0 as u32;
    let metadata: Vec<(&str, V)> = vec![
        ("general.architecture", V::String(arch.into())),
        ("qwen2.block_count", V::U32(config.num_hidden_layers as u32)),
        ("qwen2.context_length", V::U32(256)),
        ("qwen2.embedding_length", V::U32(config.hidden_size as u32)),
        ("qwen2.feed_forward_length", V::U32(config.intermediate_size as u32)),
        ("qwen2.attention.head_count", V::U32(config.num_attention_heads as u32)),
        ("qwen2.attention.head_count_kv", V::U32(config.num_kv_heads() as u32)),
        ("qwen2.rope.freq_base", V::F32(config.rope_theta() as f32)),
        ("qwen2.attention.layer_norm_rms_epsilon", V::F32(config.rms_norm_eps() as f32)),
        ("tokenizer.ggml.model", V::String("gpt2".into())),
        ("tokenizer.ggml.tokens", V::Array(tokens.iter().map(|t| V::String(t.1.clone())).collect())),
        ("tokenizer.ggml.token_type", V::Array(tokens.iter().map(|t| V::I32(t.2)).collect())),
        ("tokenizer.ggml.merges", V::Array(merges)),
        ("tokenizer.ggml.eos_token_id", V::U32(eos)),
    ];
    let metadata_refs: Vec<(&str, &V)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata_refs, &tensor_refs).unwrap();
}

fn last_logits_three_ways(gguf: &Path, ids: &[u32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let out = gguf.with_extension("hf");
    gguf_import::convert(gguf, &out).unwrap();
    let ours = load_model(out.to_str().unwrap(), &FinetuneMode::Frozen, 0, &Device::Cpu).unwrap();
    let input = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let full = ours.model.forward(&input, None).unwrap();
    let trained = full.get(0).unwrap().get(ids.len() - 1).unwrap().to_vec1::<f32>().unwrap();

    let served = served_logprobs(gguf, ids);

    let mut file = std::fs::File::open(gguf).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut reference =
        candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(content, &mut file, &Device::Cpu)
            .unwrap();
    let reference = reference.forward(&input, 0).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
    (trained, served, reference)
}

/// `served` holds log-probabilities (what the engine reports); compare them with the
/// log-softmax of `logits`.
fn served_diff(served: &[f32], logits: &[f32]) -> f32 {
    relative_diff(served, &log_softmax(logits))
}

fn relative_diff(a: &[f32], b: &[f32]) -> f32 {
    let max_abs = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / max_abs
}

#[test]
fn converted_gguf_matches_candle_transformers_quantized_qwen2() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = (5..29).collect();
    // F32 matrices: dequantization is the identity, so all three agree to rounding.
    let f32_gguf = dir.path().join("tiny-f32.gguf");
    write_gguf(&f32_gguf, GgmlDType::F32, "qwen2", None);
    let (trained, served, reference) = last_logits_three_ways(&f32_gguf, &ids);
    assert!(relative_diff(&trained, &reference) < 1e-4, "{}", relative_diff(&trained, &reference));
    assert!(served_diff(&served, &reference) < 1e-5, "{}", served_diff(&served, &reference));

    // Q8_0: candle's quantized matmul and llama.cpp's (the served engine) both quantize
    // activations, ours uses the dequantized weights in f32, so they differ by activation
    // rounding only; the engine also attends with flash attention over an f16 cache.
    let q8 = dir.path().join("tiny-q8.gguf");
    write_gguf(&q8, GgmlDType::Q8_0, "qwen2", None);
    let (trained, served, reference) = last_logits_three_ways(&q8, &ids);
    assert!(relative_diff(&trained, &reference) < 2e-2, "{}", relative_diff(&trained, &reference));
    // Measured: 0.024 against the reference on this random model (a wrong tensor layout
    // would be off by the logits' whole scale, ~1).
    assert!(served_diff(&served, &reference) < 5e-2, "{}", served_diff(&served, &reference));
    assert!(served_diff(&served, &trained) < 5e-2, "{}", served_diff(&served, &trained));
}

/// A student directory exported to GGUF carries what llama.cpp reads (architecture, vocabulary
/// with token types over every embedding row, merges, special ids, chat template); the
/// tokenizer rebuilt from it agrees with the directory's; candle-transformers' quantized
/// Qwen2 and our served decoder both load it and agree with the f32 model.
#[test]
fn exported_student_gguf_carries_llama_cpp_metadata_and_matches_the_f32_model() {
    use tangle::model::gguf_export::{export_dir, QuantFormat};
    let dir = tempfile::tempdir().unwrap();
    let student = dir.path().join("student");
    let spec = FixtureSpec::tiny(ModelFamily::Qwen2, 9);
    let config = tangle::model::fixture::write_tiny_model(&student, &spec).unwrap();
    let template = tangle::model::chat::chat_template(Some("Route."));
    for format in [QuantFormat::Q8_0, QuantFormat::Q4K] {
        let gguf = student.join(format.file_name());
        let summary = export_dir(&student, &gguf, format, "tiny student", &template).unwrap();
        // 64-wide rows fit Q8_0's 32-blocks but not Q4_K's 256: they fall back, as in llama.cpp.
        match format {
            QuantFormat::Q8_0 => assert_eq!(summary.fallback_tensors, 0, "{summary:?}"),
            QuantFormat::Q4K => assert!(summary.fallback_tensors > 0, "{summary:?}"),
            QuantFormat::F32 => {}
        }
        let mut file = std::fs::File::open(&gguf).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        let md = |k: &str| content.metadata.get(k).unwrap_or_else(|| panic!("no {k}"));
        assert_eq!(md("general.architecture").to_string().unwrap(), "qwen2");
        assert_eq!(md("tokenizer.chat_template").to_string().unwrap(), &template);
        assert_eq!(md("qwen2.block_count").to_u32().unwrap() as usize, config.num_hidden_layers);
        let tokens = md("tokenizer.ggml.tokens").to_vec().unwrap();
        assert_eq!(tokens.len(), config.vocab_size, "one token per embedding row");
        let chat = tangle::model::tokenizer::ChatTokenizer::from_file(&student.join("tokenizer.json")).unwrap();
        assert_eq!(md("tokenizer.ggml.eos_token_id").to_u32().unwrap(), chat.im_end_id());
        let types = md("tokenizer.ggml.token_type").to_vec().unwrap();
        assert_eq!(types[chat.im_end_id() as usize].to_i32().unwrap(), 3, "ChatML markers are control tokens");
        if chat.inner().get_vocab_size(true) < config.vocab_size {
            assert_eq!(types[config.vocab_size - 1].to_i32().unwrap(), 5, "rows past the tokenizer are unused padding");
        }

        let rebuilt = gguf_import::load_tokenizer(&gguf).unwrap();
        let text = "<|im_start|>user\nlabel the river stone<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(rebuilt.encode(text, false).unwrap().get_ids(), chat.encode(text).unwrap().as_slice());

        let ids: Vec<u32> = (5..29).collect();
        let ours = load_model(student.to_str().unwrap(), &FinetuneMode::Frozen, 0, &Device::Cpu).unwrap();
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let f32_logits = ours
            .model
            .forward(&input, None)
            .unwrap()
            .get(0)
            .unwrap()
            .get(ids.len() - 1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let served = served_logprobs(&gguf, &ids);
        let mut file = std::fs::File::open(&gguf).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        let mut reference =
            candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(content, &mut file, &Device::Cpu)
                .unwrap();
        let reference = reference.forward(&input, 0).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        // Weight rounding plus Q8_K activation rounding (see above); Q4_K's 4-bit weights
        // round far more.
        let tolerance = match format {
            QuantFormat::Q8_0 => 6e-2,
            QuantFormat::Q4K => 1.5e-1,
            QuantFormat::F32 => 1e-4,
        };
        assert!(served_diff(&served, &reference) < tolerance, "{format:?}: {}", served_diff(&served, &reference));
        assert!(served_diff(&served, &f32_logits) < tolerance, "{format:?}: {}", served_diff(&served, &f32_logits));
    }
}

#[test]
fn tokenizer_from_gguf_metadata_round_trips_and_keeps_chatml_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, GgmlDType::F32, "qwen2", None);
    let tokenizer = gguf_import::load_tokenizer(&path).unwrap();
    let text = "<|im_start|>user\nlabel the word: naïve café, 42 times!<|im_end|>\n";
    let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
    let im_start = tokenizer.token_to_id("<|im_start|>").unwrap();
    let im_end = tokenizer.token_to_id("<|im_end|>").unwrap();
    assert_eq!(ids[0], im_start);
    assert_eq!(ids.iter().filter(|&&i| i == im_end).count(), 1);
    // The merges are used: `user` is one token, as in the fixture's own tokenizer.json.
    assert_eq!(ids[1], tokenizer.token_to_id("user").unwrap());
}

#[test]
fn shared_prefix_kv_reuse_changes_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, GgmlDType::Q8_0, "qwen2", None);
    let with = engine(&path, 64);
    let without = engine(&path, 0);
    let mut outputs: HashMap<&str, Vec<String>> = HashMap::new();
    for (name, model) in [("with", &with), ("without", &without)] {
        // With a system prompt, then without one (only `<|im_start|>user\nlabel ` is shared).
        for (system, user) in [
            (true, "label apple"),
            (true, "label river"),
            (true, "copy the word stone"),
            (true, "label apple"),
            (false, "label apple"),
            (false, "label river"),
            (false, "label river"),
        ] {
            let mut messages = vec![Message { role: "user".into(), content: user.into() }];
            if system {
                messages.insert(0, Message { role: "system".into(), content: "Answer with one label.".into() });
            }
            let request =
                GenerateRequest { messages, max_tokens: 8, temperature: 0.0, top_p: 1.0, stop: vec![], seed: None };
            let mut text = String::new();
            model
                .generate(&request, &mut |piece| {
                    text.push_str(piece);
                    true
                })
                .unwrap();
            outputs.entry(name).or_default().push(text);
        }
    }
    assert_eq!(outputs["with"], outputs["without"]);
    assert!(outputs["with"].iter().any(|t| !t.is_empty()));
}

#[test]
fn bad_gguf_files_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let llama = dir.path().join("llama.gguf");
    write_gguf(&llama, GgmlDType::F32, "llama", None);
    let error = gguf_import::convert(&llama, &dir.path().join("out1")).unwrap_err().to_string();
    assert!(error.contains("llama.gguf") && error.contains("architecture `llama`"), "{error}");

    let missing = dir.path().join("missing.gguf");
    write_gguf(&missing, GgmlDType::F32, "qwen2", Some("blk.1.ffn_up.weight"));
    let error = gguf_import::convert(&missing, &dir.path().join("out2")).unwrap_err().to_string();
    assert!(error.contains("missing.gguf") && error.contains("blk.1.ffn_up.weight"), "{error}");

    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"not a gguf at all").unwrap();
    let error = gguf_import::convert(&garbage, &dir.path().join("out3")).unwrap_err().to_string();
    assert!(error.contains("garbage.gguf") && error.contains("not a GGUF"), "{error}");
}
