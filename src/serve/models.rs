//! What `tangle serve MODEL` can serve, and how MODEL is found: a registry reference
//! (`production`, `NAME`, `NAME@ALIAS`, `NAME@VERSION`), a packaged artifact, a Hugging Face
//! model directory, or a GGUF file. Artifacts are verified against their manifest before a
//! byte of them is loaded.

use super::{ChatModel, FinishReason, GenerateRequest, GenerateResult, ModelError};
use crate::artifact;
use crate::model::chat::{Sampling, StudentChat};
use crate::model::loading::select_device;
use crate::registry::Registry;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A fine-tuned (or any Hugging Face Qwen-family) student.
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

/// Loads what [`locate`] found. Artifacts are verified first: a tampered file is refused.
pub fn load(location: &ModelLocation, device: &str, weights: WeightsChoice) -> Result<Arc<dyn ChatModel>, String> {
    let device = select_device(device).map_err(|e| e.to_string())?;
    let (dir, id) = match location {
        ModelLocation::Artifact { dir, id } => {
            artifact::verify(dir).map_err(|e| format!("refusing to serve {}: {e}", dir.display()))?;
            (dir.clone(), id.clone())
        }
        ModelLocation::Directory(dir) => {
            (dir.clone(), dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default())
        }
        ModelLocation::Gguf(path) => return load_gguf(path),
    };
    let meta = StudentChat::read_meta(&dir).map_err(|e| e.to_string())?;
    let quantized = meta.as_ref().filter(|m| m.quantized.is_some());
    match (weights, quantized) {
        (WeightsChoice::Auto | WeightsChoice::Gguf, Some(meta)) if device.is_cpu() => {
            return Ok(Arc::new(super::gguf_model::GgufChatModel::load_student(&dir, meta, id)?));
        }
        (WeightsChoice::Gguf, Some(_)) => {
            return Err("the quantized weights are served on the CPU only\nhint: pass `--device cpu`, or `--weights safetensors` for this device".into())
        }
        (WeightsChoice::Gguf, None) => {
            return Err(format!(
                "{} has no quantized weights\nhint: set `student.quantize: q8_0` in the pipeline, or serve with `--weights safetensors`",
                dir.display()
            ))
        }
        _ => {}
    }
    let chat = StudentChat::load(&dir.display().to_string(), &device)
        .map_err(|e| format!("cannot load the model in {}: {e}", dir.display()))?;
    Ok(Arc::new(StudentChatModel::new(id, chat)))
}

fn load_gguf(path: &Path) -> Result<Arc<dyn ChatModel>, String> {
    let model = super::gguf_model::GgufChatModel::load(path)?;
    Ok(Arc::new(model))
}
