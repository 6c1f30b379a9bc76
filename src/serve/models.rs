//! What `tangle serve MODEL` can serve, and how MODEL is found: a registry reference
//! (`production`, `NAME`, `NAME@ALIAS`, `NAME@VERSION`), a packaged artifact, a Hugging Face
//! model directory, or a GGUF file. Artifacts are verified against their manifest before a
//! byte of them is loaded. Everything is served by the engine: a student's quantized GGUF
//! as it is, its safetensors through an f32 GGUF converted once (cached under
//! `$TANGLE_HOME/converted`, keyed by the weights' sha256).

use super::{ChatModel, FinishReason, GenerateRequest, GenerateResult, ModelError, ModelSlot};
use crate::artifact;
use crate::model::chat::{Sampling, StudentChat};
use crate::model::engine::{Device, Engine, EngineOptions, ModelSource};
use crate::model::gguf_export::{export_dir, QuantFormat};
use crate::registry::Registry;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A fine-tuned (or any Hugging Face Qwen-family) student generating in process with
/// candle, one request at a time: the reference the engine's answers are checked against.
pub struct StudentChatModel {
    id: String,
    // The decoder keeps a dropout RNG in a RefCell, so it is not Sync; generation on CPU
    // uses every core for one request anyway.
    chat: Mutex<StudentChat>,
}

impl StudentChatModel {
    pub fn new(id: impl Into<String>, chat: StudentChat) -> Self {
        StudentChatModel { id: id.into(), chat: Mutex::new(chat) }
    }
}

impl ChatModel for StudentChatModel {
    fn id(&self) -> &str {
        &self.id
    }

    fn generate(
        &self,
        request: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenerateResult, ModelError> {
        let chat = crate::support::lock(&self.chat);
        let messages: Vec<(String, String)> =
            request.messages.iter().map(|m| (m.role.clone(), m.content.clone())).collect();
        let messages = chat.with_default_system(&messages);
        let sampling =
            Sampling { temperature: request.temperature, top_p: request.top_p, seed: request.seed.unwrap_or(0) };
        let completion = chat
            .complete(&messages, request.max_tokens as usize, sampling, &request.stop, on_text)
            .map_err(|e| match e {
                crate::model::loading::LoadError::Model(m) => ModelError::BadRequest(m.to_string()),
                other => ModelError::Failed(other.to_string()),
            })?;
        Ok(GenerateResult {
            prompt_tokens: completion.prompt_tokens as u32,
            completion_tokens: completion.completion_tokens as u32,
            finish: if completion.hit_limit { FinishReason::Length } else { FinishReason::Stop },
        })
    }
}

/// Where a serve reference points.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelLocation {
    /// An artifact directory (with `manifest.json`); `id` names it for clients.
    Artifact {
        dir: PathBuf,
        id: String,
    },
    /// A Hugging Face model directory.
    Directory(PathBuf),
    Gguf(PathBuf),
}

/// Resolves MODEL: an existing path first, then the registry.
pub fn locate(reference: &str, registry_root: &Path) -> Result<ModelLocation, String> {
    let path = Path::new(reference);
    if path.is_file() && reference.to_ascii_lowercase().ends_with(".gguf") {
        return Ok(ModelLocation::Gguf(path.to_path_buf()));
    }
    if path.is_dir() {
        for candidate in [path.to_path_buf(), path.join("artifact")] {
            if candidate.join(artifact::MANIFEST_FILE).is_file() {
                let id = candidate.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                return Ok(ModelLocation::Artifact { dir: candidate, id });
            }
        }
        if path.join("config.json").is_file() {
            return Ok(ModelLocation::Directory(path.to_path_buf()));
        }
        return Err(format!(
            "{} is neither an artifact (no manifest.json) nor a model directory (no config.json)",
            path.display()
        ));
    }
    let registry = Registry::open(registry_root);
    let listing = registry.list().map_err(|e| format!("cannot read the registry {}: {e}", registry_root.display()))?;
    // A bare alias (`production`) is accepted when exactly one pipeline has it.
    let reference = if reference.contains('@') || listing.iter().any(|p| p.pipeline == reference) {
        reference.to_string()
    } else {
        let owners: Vec<&str> = listing
            .iter()
            .filter(|p| p.aliases.iter().any(|(a, _)| a == reference))
            .map(|p| p.pipeline.as_str())
            .collect();
        match owners.as_slice() {
            [one] => format!("{one}@{reference}"),
            [] => {
                return Err(format!(
                    "`{reference}` is not a file, a directory, a pipeline or an alias in the registry {}\nhint: `tangle registry list` shows what is deployed",
                    registry_root.display()
                ))
            }
            many => {
                return Err(format!(
                    "alias `{reference}` exists for several pipelines ({}); say which, e.g. `{}@{reference}`",
                    many.join(", "),
                    many[0]
                ))
            }
        }
    };
    let deployed = registry.lookup(&reference, "production").map_err(|e| e.to_string())?;
    let name = reference.split('@').next().unwrap_or_default();
    Ok(ModelLocation::Artifact { dir: deployed.dir.join("artifact"), id: format!("{name}@{}", deployed.version) })
}

/// Which weights of an exported student to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum WeightsChoice {
    /// The quantized copy (`model-q8_0.gguf`) when the student has one, else the safetensors.
    #[default]
    Auto,
    /// `model.safetensors`, full precision.
    Safetensors,
    /// The quantized copy; an error when there is none.
    Gguf,
}

/// Loads what [`locate`] found into an engine. Artifacts are verified first: a tampered
/// file is refused.
pub fn load(location: &ModelLocation, weights: WeightsChoice, options: &EngineOptions) -> Result<Engine, String> {
    let source = source(location, weights)?;
    Engine::start(source, options.clone())
}

/// `--device` for the engine.
pub fn device(text: &str) -> Result<Device, String> {
    Device::parse(text)
}

fn source(location: &ModelLocation, weights: WeightsChoice) -> Result<ModelSource, String> {
    let (dir, id, manifest) = match location {
        ModelLocation::Artifact { dir, id } => {
            let manifest = artifact::verify(dir).map_err(|e| format!("refusing to serve {}: {e}", dir.display()))?;
            (dir.clone(), id.clone(), Some(manifest))
        }
        ModelLocation::Directory(dir) => {
            (dir.clone(), dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(), None)
        }
        ModelLocation::Gguf(path) => {
            let tokenizer = crate::model::gguf_import::load_tokenizer(path).map_err(|e| e.to_string())?;
            let id = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "gguf".into());
            return Ok(ModelSource { id, gguf: path.clone(), tokenizer, default_system: None });
        }
    };
    let meta = StudentChat::read_meta(&dir).map_err(|e| e.to_string())?;
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| format!("cannot load {}: {e}", tokenizer_path.display()))?;
    let default_system = meta.as_ref().and_then(|m| m.system.clone());
    let quantized = meta.as_ref().and_then(|m| m.quantized.clone());
    let gguf = match (weights, quantized) {
        (WeightsChoice::Auto | WeightsChoice::Gguf, Some(copy)) => dir.join(&copy.file),
        (WeightsChoice::Gguf, None) => {
            return Err(format!(
                "{} has no quantized weights\nhint: set `student.quantize: q8_0` in the pipeline, or serve with `--weights safetensors`",
                dir.display()
            ))
        }
        _ => {
            // A verified artifact's manifest already holds the weights' hash.
            let digest = manifest.and_then(|m| m.files.get(WEIGHTS_FILE).cloned());
            full_precision_gguf(&dir, digest, default_system.as_deref())?
        }
    };
    Ok(ModelSource { id, gguf, tokenizer, default_system })
}

const WEIGHTS_FILE: &str = "model.safetensors";

/// The f32 GGUF of a model directory's safetensors, converted on first use and kept
/// under `$TANGLE_HOME/converted/f32-<sha256 of the weights>.gguf`.
fn full_precision_gguf(dir: &Path, digest: Option<String>, system: Option<&str>) -> Result<PathBuf, String> {
    let weights = dir.join(WEIGHTS_FILE);
    let digest = match digest {
        Some(d) => d,
        None => crate::fsutil::sha256_file(&weights).map_err(|e| format!("cannot read {}: {e}", weights.display()))?,
    };
    let root = crate::model::gguf_import::converted_root();
    std::fs::create_dir_all(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    let out = root.join(format!("f32-{}.gguf", &digest[..24]));
    if out.is_file() {
        return Ok(out);
    }
    let tmp = root.join(format!(".tmp-{}-f32-{}.gguf", std::process::id(), &digest[..24]));
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let template = crate::model::chat::chat_template(system);
    export_dir(dir, &tmp, QuantFormat::F32, &name, &template)
        .map_err(|e| format!("cannot prepare {} for serving: {e}", dir.display()))?;
    std::fs::rename(&tmp, &out).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    Ok(out)
}

/// Whether `reference` names something in the registry (and so can move) rather than a
/// path.
pub fn follows_registry(reference: &str) -> bool {
    !Path::new(reference).exists()
}

/// Keeps `slot` on what `reference` points at in the registry: every `interval`, the
/// reference is resolved again; when it moved (a promote or a rollback), the new version
/// is loaded beside the old one and swapped in. Runs on its own thread until the process
/// ends; failures to load are reported and the old version keeps answering.
pub fn follow(
    reference: String,
    registry: PathBuf,
    weights: WeightsChoice,
    options: EngineOptions,
    slot: Arc<ModelSlot>,
    mut current: ModelLocation,
    interval: std::time::Duration,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("tangle-serve-follow".into()).spawn(move || loop {
        std::thread::sleep(interval);
        let Ok(next) = locate(&reference, &registry) else { continue };
        if next == current {
            continue;
        }
        match load(&next, weights, &options) {
            Ok(engine) => {
                eprintln!("`{reference}` moved: now serving {}", engine.info().id);
                slot.replace(engine);
                current = next;
            }
            Err(e) => {
                eprintln!("warning: `{reference}` moved but the new version cannot be served: {e}");
                current = next;
            }
        }
    })?;
    Ok(())
}
