//! Artifacts and `tangle serve`: a trained tiny model's artifact reloads through our loader
//! and through candle-transformers' Qwen2 with identical greedy outputs; a tampered file is
//! refused; the HTTP server (JSON and SSE) returns exactly the in-process generation; the
//! official `openai` Python package completes chats against it, streaming too.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tangle::artifact::{self, Lineage};
use tangle::model::chat::{chat_template, write_student_files, QuantizedCopy, Sampling, StudentChat, StudentMeta};
use tangle::model::config::ModelFamily;
use tangle::model::engine::EngineOptions;
use tangle::model::fixture::{write_tiny_model, FixtureSpec};
use tangle::model::gguf_export::{export_dir, QuantFormat};
use tangle::model::loading::{load_model, load_weights, save_model_dir, FinetuneMode};
use tangle::model::tokenizer::ChatExample;
use tangle::serve::models::{load, ModelLocation, WeightsChoice};
use tangle::serve::{router, ChatModel, GenerateRequest, Message, ModelSlot, ServeOptions};
use tangle::train::{TrainConfig, TrainExample, Trainer};

const PROMPTS: [&str; 3] = ["label apple", "label river", "copy the word stone"];

/// Trains a tiny Qwen2 a few steps and packages it as an artifact (with a Q8_0 copy when
/// `quantized`); returns its directory.
fn trained_artifact(root: &Path, quantized: bool) -> PathBuf {
    let base = root.join("base");
    write_tiny_model(&base, &FixtureSpec::tiny(ModelFamily::Qwen2, 11)).unwrap();
    let loaded = load_model(base.to_str().unwrap(), &FinetuneMode::Full, 1, &Device::Cpu).unwrap();
    let examples: Vec<TrainExample> = [("label apple", "A"), ("label river", "B")]
        .iter()
        .map(|(p, t)| TrainExample {
            chat: ChatExample { system: Some("Be brief.".into()), prompt: p.to_string(), target: t.to_string() },
            teacher: None,
        })
        .collect();
    let config = TrainConfig { epochs: 20, batch_size: 2, lr: 1e-2, ..TrainConfig::default() };
    let mut trainer = Trainer::new(loaded.model, &loaded.trainable, loaded.tokenizer, &examples, config).unwrap();
    trainer.train(&mut |_| {}, &AtomicBool::new(false)).unwrap();
    let dir = root.join("artifact");
    save_model_dir(trainer.model(), trainer.tokenizer(), &dir, None).unwrap();
    let mut meta = StudentMeta { system: Some("Be brief.".into()), max_seq_len: 128, quantized: None };
    if quantized {
        let format = QuantFormat::Q8_0;
        let template = chat_template(meta.system.as_deref());
        export_dir(&dir, &dir.join(format.file_name()), format, "serve-test", &template).unwrap();
        meta.quantized = Some(QuantizedCopy { file: format.file_name(), format: format.name().into() });
    }
    write_student_files(&dir, &meta).unwrap();
    let lineage = Lineage {
        pipeline: "serve-test".into(),
        run_id: "r".into(),
        tangle_version: "test".into(),
        created_at: "2026-01-01T00:00:00Z".into(),
        spec_sha256: "0".into(),
        dataset_sha256: "0".into(),
        base_model: "fixture".into(),
        teacher: vec![],
    };
    artifact::write_manifest(&dir, lineage).unwrap();
    dir
}

fn messages(prompt: &str) -> Vec<(String, String)> {
    vec![("system".into(), "Be brief.".into()), ("user".into(), prompt.into())]
}

/// Greedy ids from candle-transformers' own Qwen2 with its KV cache.
fn reference_greedy(dir: &Path, prompt_ids: &[u32], max_new: usize, stop: u32) -> Vec<u32> {
    let device = Device::Cpu;
    let cfg: candle_transformers::models::qwen2::Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vb = VarBuilder::from_tensors(load_weights(dir, &device).unwrap(), DType::F32, &device);
    let mut model = candle_transformers::models::qwen2::ModelForCausalLM::new(&cfg, vb).unwrap();
    let mut out = Vec::new();
    let mut input = Tensor::new(prompt_ids, &device).unwrap().unsqueeze(0).unwrap();
    let mut offset = 0;
    for _ in 0..max_new {
        let logits = model.forward(&input, offset).unwrap();
        offset += input.dim(1).unwrap();
        let next = logits.squeeze(0).unwrap().squeeze(0).unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
        if next == stop {
            break;
        }
        out.push(next);
        input = Tensor::new(&[next], &device).unwrap().unsqueeze(0).unwrap();
    }
    out
}

#[test]
fn artifact_reloads_identically_through_both_loaders_and_tampering_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = trained_artifact(root.path(), false);
    let chat = StudentChat::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    let loaded = load_model(dir.to_str().unwrap(), &FinetuneMode::Frozen, 0, &Device::Cpu).unwrap();
    let stop = loaded.tokenizer.im_end_id();
    let mut compared = 0;
    for prompt in PROMPTS {
        let ids = loaded.tokenizer.encode(&tangle::model::chat::render_chatml(&messages(prompt))).unwrap();
        let ours = chat.complete(&messages(prompt), 12, Sampling::GREEDY, &[], &mut |_| true).unwrap();
        let theirs = reference_greedy(&dir, &ids, 12, stop);
        let theirs_text = loaded.tokenizer.decode(&theirs, true).unwrap();
        assert_eq!(ours.text, theirs_text, "prompt {prompt:?}");
        assert_eq!(ours.completion_tokens, theirs.len());
        compared += theirs.len();
    }
    assert!(compared > 0, "nothing was generated to compare");

    // Verified before loading; one flipped byte is named in the refusal.
    let location = ModelLocation::Artifact { dir: dir.clone(), id: "serve-test".into() };
    assert!(load(&location, WeightsChoice::Auto, &EngineOptions::default()).is_ok());
    let weights = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&weights, bytes).unwrap();
    let error = load(&location, WeightsChoice::Auto, &EngineOptions::default())
        .err()
        .expect("a tampered artifact must be refused");
    assert!(error.contains("refusing") && error.contains("model.safetensors"), "{error}");
}

fn greedy(model: &dyn ChatModel, prompt: &str) -> String {
    let request = GenerateRequest {
        messages: vec![Message { role: "user".into(), content: prompt.into() }],
        max_tokens: 12,
        temperature: 0.0,
        top_p: 1.0,
        stop: vec![],
        seed: None,
    };
    let mut text = String::new();
    model
        .generate(&request, &mut |piece| {
            text.push_str(piece);
            true
        })
        .unwrap();
    text
}

/// Greedy text from candle-transformers' quantized Qwen2 (the llama.cpp-format reference)
/// on an exported GGUF, prompted with the system prompt the student was trained with.
fn reference_quantized_greedy(
    gguf: &Path,
    tokenizer: &tangle::model::tokenizer::ChatTokenizer,
    prompt: &str,
) -> String {
    use candle_core::quantized::gguf_file;
    let mut file = std::fs::File::open(gguf).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut model =
        candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(content, &mut file, &Device::Cpu)
            .unwrap();
    let ids = tokenizer.encode(&tangle::model::chat::render_chatml(&messages(prompt))).unwrap();
    let (mut input, mut offset, mut out) = (ids.clone(), 0, Vec::new());
    for _ in 0..12 {
        let logits = model.forward(&Tensor::new(input.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), offset);
        offset += input.len();
        let next = logits.unwrap().squeeze(0).unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
        if next == tokenizer.im_end_id() {
            break;
        }
        out.push(next);
        input = vec![next];
    }
    tokenizer.decode(&out, true).unwrap()
}

/// A student exported with a Q8_0 copy is served from it by default (default system prompt
/// applied, answers equal to candle-transformers' quantized Qwen2 on the same file), from the
/// safetensors on request; the copy is verified like every file; asking for a copy that does
/// not exist names the setting that makes one.
#[test]
fn quantized_copy_is_served_by_default_verified_and_matches_the_reference() {
    let root = tempfile::tempdir().unwrap();
    let dir = trained_artifact(root.path(), true);
    let location = ModelLocation::Artifact { dir: dir.clone(), id: "serve-test".into() };
    let quantized = load(&location, WeightsChoice::Auto, &EngineOptions::default()).unwrap();
    let full = load(&location, WeightsChoice::Safetensors, &EngineOptions::default()).unwrap();
    let f32_chat = StudentChat::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    let tokenizer = tangle::model::tokenizer::ChatTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    for prompt in ["label apple", "label river"] {
        let served = greedy(&quantized, prompt);
        assert!(!served.is_empty(), "{prompt}");
        assert_eq!(served, reference_quantized_greedy(&dir.join("model-q8_0.gguf"), &tokenizer, prompt), "{prompt}");
        // Trained answers have wide margins: quantization keeps them.
        let f32_text = f32_chat.complete(&messages(prompt), 12, Sampling::GREEDY, &[], &mut |_| true).unwrap().text;
        assert_eq!(greedy(&full, prompt), f32_text);
        assert_eq!(served, f32_text, "{prompt}");
    }

    let gguf = dir.join("model-q8_0.gguf");
    let mut bytes = std::fs::read(&gguf).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&gguf, bytes).unwrap();
    let error =
        load(&location, WeightsChoice::Auto, &EngineOptions::default()).err().expect("a tampered copy must be refused");
    assert!(error.contains("refusing") && error.contains("model-q8_0.gguf"), "{error}");

    let plain = trained_artifact(&root.path().join("plain"), false);
    let error = load(&ModelLocation::Directory(plain), WeightsChoice::Gguf, &EngineOptions::default())
        .err()
        .expect("no quantized copy");
    assert!(error.contains("no quantized weights") && error.contains("student.quantize"), "{error}");
}

struct Server {
    base_url: String,
    expected: Vec<(String, String)>,
    request_log: PathBuf,
    _rt: tokio::runtime::Runtime,
}

fn start_server() -> (tempfile::TempDir, Server) {
    let root = tempfile::tempdir().unwrap();
    let dir = trained_artifact(root.path(), false);
    // In-process generations are the expectation for every HTTP answer.
    let chat = StudentChat::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    let expected = PROMPTS
        .iter()
        .map(|p| {
            let text = chat.complete(&messages(p), 16, Sampling::GREEDY, &[], &mut |_| true).unwrap().text;
            (p.to_string(), text)
        })
        .collect();
    // Served by the engine (the f32 weights converted for it); the expectation is candle's.
    let engine_options = EngineOptions { max_running: 2, queue: 16, ..EngineOptions::default() };
    let location = ModelLocation::Artifact { dir: dir.clone(), id: "tiny".into() };
    let engine = load(&location, WeightsChoice::Auto, &engine_options).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let request_log = root.path().join("requests.jsonl");
    let options =
        ServeOptions { engine: engine_options, default_max_tokens: 16, request_log: Some(request_log.clone()) };
    let app = router(ModelSlot::new(engine), &options).unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await });
    (root, Server { base_url: format!("http://{addr}/v1"), expected, request_log, _rt: rt })
}

#[test]
fn http_answers_equal_in_process_generation_json_and_sse() {
    let (_root, server) = start_server();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        for (prompt, expected) in &server.expected {
            let body = serde_json::json!({
                "model": "tiny",
                "messages": [{ "role": "system", "content": "Be brief." }, { "role": "user", "content": prompt }],
                "max_tokens": 16,
                "temperature": 0,
            });
            let url = format!("{}/chat/completions", server.base_url);
            let json: serde_json::Value = client.post(&url).json(&body).send().await.unwrap().json().await.unwrap();
            assert_eq!(json["choices"][0]["message"]["content"].as_str().unwrap(), expected, "{json:#}");
            assert!(json["usage"]["completion_tokens"].as_u64().unwrap() > 0);

            let mut streaming = body.clone();
            streaming["stream"] = true.into();
            streaming["stream_options"] = serde_json::json!({ "include_usage": true });
            let sse = client.post(&url).json(&streaming).send().await.unwrap().text().await.unwrap();
            let mut text = String::new();
            let mut saw_usage = false;
            for data in sse.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if data == "[DONE]" {
                    break;
                }
                let chunk: serde_json::Value = serde_json::from_str(data).unwrap();
                if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
                    text.push_str(piece);
                }
                saw_usage |= chunk["usage"]["completion_tokens"].is_u64();
            }
            assert_eq!(&text, expected);
            assert!(saw_usage, "stream_options.include_usage was ignored");
        }
    });
    // One line per answered request (JSON and SSE for each prompt): the same prompt hashes
    // alike, different prompts differently, and no prompt text is written.
    let log = std::fs::read_to_string(&server.request_log).unwrap();
    let hashes: Vec<String> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["messages_sha256"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(hashes.len(), 2 * server.expected.len(), "{log}");
    let distinct: std::collections::HashSet<&String> = hashes.iter().collect();
    assert_eq!(distinct.len(), server.expected.len(), "{log}");
    for (prompt, _) in &server.expected {
        assert!(!log.contains(prompt.as_str()), "the request log holds prompt text: {log}");
    }
}

/// Whether python3 has the official `openai` package. CI must have it; elsewhere a
/// machine without it skips loudly.
fn openai_client_available() -> bool {
    let has_client = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !has_client {
        assert!(std::env::var("CI").is_err(), "CI must install the `openai` Python package (.ci/run does)");
        eprintln!("SKIPPED: python3 with the `openai` package is not installed (pip install openai)");
    }
    has_client
}

/// The official client, unchanged, in CI. Outside CI a machine without it skips loudly.
#[test]
fn official_openai_python_client_completes_chats() {
    if !openai_client_available() {
        return;
    }
    let (_root, server) = start_server();
    let (prompt, expected) = &server.expected[0];
    let script = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="unused")
messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": sys.argv[2]}]
full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
streamed = "".join(
    (chunk.choices[0].delta.content or "")
    for chunk in client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0, stream=True)
    if chunk.choices
)
print(repr(full.choices[0].message.content))
print(repr(streamed))
"#;
    let output = std::process::Command::new("python3").args(["-c", script, &server.base_url, prompt]).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    let python_repr = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"));
    assert_eq!(lines, vec![python_repr(expected), python_repr(expected)]);
}

/// A package (`DIR/artifact` with a manifest) of a tiny random Qwen2 with a Q8_0 copy.
fn fixture_package(root: &Path, seed: u64) -> PathBuf {
    let pkg = root.join(format!("pkg-{seed}"));
    let dir = pkg.join("artifact");
    write_tiny_model(&dir, &FixtureSpec::tiny(ModelFamily::Qwen2, seed)).unwrap();
    let format = QuantFormat::Q8_0;
    export_dir(&dir, &dir.join(format.file_name()), format, "fixture", &chat_template(None)).unwrap();
    let meta = StudentMeta {
        system: None,
        max_seq_len: 256,
        quantized: Some(QuantizedCopy { file: format.file_name(), format: format.name().into() }),
    };
    write_student_files(&dir, &meta).unwrap();
    let lineage = Lineage {
        pipeline: "intent".into(),
        run_id: format!("r{seed}"),
        tangle_version: "test".into(),
        created_at: "2026-01-01T00:00:00Z".into(),
        spec_sha256: "0".into(),
        dataset_sha256: "0".into(),
        base_model: "fixture".into(),
        teacher: vec![],
    };
    artifact::write_manifest(&dir, lineage).unwrap();
    pkg
}

struct Running {
    base_url: String,
    rt: tokio::runtime::Runtime,
}

/// `tangle serve REFERENCE` in process (following the registry when REFERENCE is an alias).
fn serve_reference(reference: &str, registry: &Path, engine: EngineOptions) -> Running {
    let location = tangle::serve::models::locate(reference, registry).unwrap();
    let loaded = load(&location, WeightsChoice::Auto, &engine).unwrap();
    let slot = ModelSlot::new(loaded);
    tangle::serve::models::follow(
        reference.into(),
        registry.to_path_buf(),
        WeightsChoice::Auto,
        engine.clone(),
        Arc::clone(&slot),
        location,
        std::time::Duration::from_millis(100),
    )
    .unwrap();
    let options = ServeOptions { engine, default_max_tokens: 16, request_log: None };
    let app = router(slot, &options).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await });
    Running { base_url: format!("http://{addr}"), rt }
}

async fn gauge(client: &reqwest::Client, base: &str, name: &str) -> f64 {
    let text = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// 64 streaming clients at once, a third of them hanging up after the first chunk: every
/// finished stream is complete, and the engine ends with no running sequence and no KV
/// cell held.
#[test]
fn sixty_four_streaming_clients_some_leaving_leave_nothing_behind() {
    let root = tempfile::tempdir().unwrap();
    let pkg = fixture_package(root.path(), 21);
    let engine = EngineOptions { max_running: 16, queue: 64, ..EngineOptions::default() };
    let server = serve_reference(pkg.join("artifact").to_str().unwrap(), &root.path().join("registry"), engine);
    let base = server.base_url.clone();
    server.rt.block_on(async move {
        let client = reqwest::Client::new();
        let mut tasks = Vec::new();
        for i in 0..64 {
            let (client, base) = (client.clone(), base.clone());
            tasks.push(tokio::spawn(async move {
                let body = serde_json::json!({
                    "messages": [{ "role": "user", "content": format!("label item {i}") }],
                    "max_tokens": 48, "temperature": 0, "stream": true,
                });
                let mut response = client.post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
                assert_eq!(response.status(), 200);
                if i % 3 == 0 {
                    let _ = response.chunk().await.unwrap();
                    return None; // hang up mid-stream
                }
                let mut text = String::new();
                while let Some(bytes) = response.chunk().await.unwrap() {
                    text.push_str(&String::from_utf8_lossy(&bytes));
                }
                Some(text)
            }));
        }
        let mut complete = 0;
        for t in tasks {
            if let Some(text) = t.await.unwrap() {
                assert!(text.contains("\"finish_reason\":\"") && text.trim_end().ends_with("data: [DONE]"), "{text}");
                complete += 1;
            }
        }
        assert_eq!(complete, 42);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let running = gauge(&client, &base, "tangle_serve_running_sequences").await;
            let held = gauge(&client, &base, "tangle_serve_kv_tokens_running").await;
            let reserved = gauge(&client, &base, "tangle_serve_kv_tokens_reserved").await;
            if running == 0.0 && held == 0.0 && reserved == 0.0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "left behind: {running} running, {held} KV held, {reserved} reserved"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(gauge(&client, &base, "tangle_serve_requests_total").await, 64.0);
    });
}

/// Serving an alias while it is promoted and rolled back under load: no request fails,
/// answers come from both versions, and `/v1/models` names the one answering.
#[test]
fn promote_and_rollback_under_load_drop_no_request() {
    use tangle::registry::Registry;
    let root = tempfile::tempdir().unwrap();
    let registry_root = root.path().join("registry");
    let registry = Registry::open(&registry_root);
    let v1 = registry.register("intent", &fixture_package(root.path(), 31)).unwrap();
    let v2 = registry.register("intent", &fixture_package(root.path(), 32)).unwrap();
    registry.set_alias("intent", "production", &v1).unwrap();
    let server = serve_reference("production", &registry_root, EngineOptions::default());
    let base = server.base_url.clone();
    let models = |client: reqwest::Client, base: String| async move {
        let v: serde_json::Value = client.get(format!("{base}/v1/models")).send().await.unwrap().json().await.unwrap();
        v["data"][0]["id"].as_str().unwrap().to_string()
    };
    server.rt.block_on(async move {
        let client = reqwest::Client::new();
        assert_eq!(models(client.clone(), base.clone()).await, format!("intent@{v1}"));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut load = Vec::new();
        for i in 0..6 {
            let (client, base, stop) = (client.clone(), base.clone(), Arc::clone(&stop));
            load.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let body = serde_json::json!({
                        "messages": [{ "role": "user", "content": format!("label {i}") }], "max_tokens": 8, "temperature": 0,
                    });
                    let response = client.post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
                    assert_eq!(response.status(), 200);
                    let json: serde_json::Value = response.json().await.unwrap();
                    seen.push(json["model"].as_str().unwrap().to_string());
                }
                seen
            }));
        }
        let wait_for = |want: String| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                while models(client.clone(), base.clone()).await != want {
                    assert!(std::time::Instant::now() < deadline, "never switched to {want}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        };
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        registry.set_alias("intent", "production", &v2).unwrap();
        wait_for(format!("intent@{v2}")).await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        registry.rollback("intent", "production").unwrap();
        wait_for(format!("intent@{v1}")).await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut seen = Vec::new();
        for t in load {
            seen.extend(t.await.unwrap());
        }
        assert!(seen.contains(&format!("intent@{v1}")) && seen.contains(&format!("intent@{v2}")), "{seen:?}");
    });
}

/// The official client: `logprobs`/`top_logprobs` in OpenAI's shape, structured output by
/// JSON schema and by a fixed choice, `n`, and prompt scoring through `/v1/completions`.
#[test]
fn official_openai_client_gets_logprobs_structured_output_and_prompt_scores() {
    if !openai_client_available() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let pkg = fixture_package(root.path(), 41);
    let server = serve_reference(
        pkg.join("artifact").to_str().unwrap(),
        &root.path().join("registry"),
        EngineOptions::default(),
    );
    let script = r#"
import json, sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
messages = [{"role": "user", "content": "route my refund"}]
r = client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
content = r.choices[0].logprobs.content
assert len(content) == r.usage.completion_tokens, (len(content), r.usage)
assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 and t.bytes is not None for t in content), content
assert content[0].token == content[0].top_logprobs[0].token, "greedy picks the most likely token"
schema = {"type": "object", "properties": {"queue": {"enum": ["billing", "returns"]}, "n": {"type": "integer"}},
          "required": ["queue", "n"], "additionalProperties": False}
for seed in range(4):
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=64, temperature=1, seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "route", "schema": schema, "strict": True}})
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"queue", "n"} and value["queue"] in ("billing", "returns") and isinstance(value["n"], int), value
r = client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=1, n=3, seed=5,
    extra_body={"guided_choice": ["billing", "shipping", "returns"]})
assert len(r.choices) == 3 and all(c.message.content in ("billing", "shipping", "returns") for c in r.choices), r.choices
c = client.completions.create(model="m", prompt="label the river stone", max_tokens=0, echo=True, logprobs=2)
lp = c.choices[0].logprobs
assert c.choices[0].text == "label the river stone", c.choices[0].text
assert len(lp.token_logprobs) == c.usage.prompt_tokens and lp.token_logprobs[0] is None, lp
assert all(x <= 0 for x in lp.token_logprobs[1:]) and all(len(t) >= 1 for t in lp.top_logprobs[1:]), lp
print("ok")
"#;
    let output = std::process::Command::new("python3").args(["-c", script, &server.base_url]).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(stdout.trim(), "ok");
}
