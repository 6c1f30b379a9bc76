//! Loading and saving Hugging Face model directories.
//!
//! A source is a local directory (`config.json`, `tokenizer.json`, `model.safetensors` or
//! a sharded `model.safetensors.index.json`) or a hub id resolved through hf-hub's cache
//! (`HF_HOME`); with `HF_HUB_OFFLINE=1` only the local cache is consulted. Weights are
//! converted to f32 for training. Saving writes `config.json`, `model.safetensors` (LoRA
//! merged), `tokenizer.json` and `generation_config.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::model::config::{ConfigError, ModelConfig};
use crate::model::lora::{init_lora_varmap, LoraConfig, LoraError};
use crate::model::qwen::{ModelError, QwenModel};
use crate::model::tokenizer::{ChatTokenizer, TokenizerError};

/// Errors locating, reading or writing a model directory.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model {source_name:?} is neither a local directory nor in the Hugging Face cache ({cache})\nhint: pass a directory holding config.json, or unset HF_HUB_OFFLINE to download")]
    NotCached { source_name: String, cache: String },
    #[error("cannot fetch {file} of {model} from the hub: {message}")]
    Hub { model: String, file: String, message: String },
    #[error("{dir} has no model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: String },
    #[error("unknown device {0:?}\nhint: use cpu, cuda, cuda:N or auto")]
    UnknownDevice(String),
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("cannot write {path}: {message}")]
    Write { path: String, message: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Lora(#[from] LoraError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Which weights are trainable.
#[derive(Debug, Clone, PartialEq)]
pub enum FinetuneMode {
    /// Every weight is a variable.
    Full,
    /// Base weights frozen; adapters created from the seed are the only variables.
    Lora(LoraConfig),
    /// Nothing trainable (inference, teacher, evals).
    Frozen,
}

/// A model ready to train or run.
pub struct LoadedModel {
    pub config: ModelConfig,
    pub model: QwenModel,
    /// The trainable variables (empty when frozen), by HF / PEFT name.
    pub trainable: VarMap,
    pub tokenizer: ChatTokenizer,
    /// Where the files were read from.
    pub dir: PathBuf,
}

fn is_truthy(var: &str) -> bool {
    std::env::var(var)
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// Resolves a local directory or hub id to a directory holding the model files.
pub fn resolve_model_dir(source: &str) -> Result<PathBuf, LoadError> {
    let local = Path::new(source);
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    if local.is_file() && source.to_ascii_lowercase().ends_with(".gguf") {
        return super::gguf_import::converted_dir(local)
            .map_err(|e| LoadError::Read { path: source.to_string(), message: e.to_string() });
    }
    let cache = hf_hub::Cache::from_env();
    if is_truthy("HF_HUB_OFFLINE") {
        let repo = cache.model(source.to_string());
        return repo.get("config.json").and_then(|path| path.parent().map(Path::to_path_buf)).ok_or_else(|| {
            LoadError::NotCached { source_name: source.to_string(), cache: cache.path().display().to_string() }
        });
    }
    let hub_error =
        |file: &str, message: String| LoadError::Hub { model: source.to_string(), file: file.to_string(), message };
    let api = hf_hub::api::sync::ApiBuilder::from_env().build().map_err(|e| hub_error("(api)", e.to_string()))?;
    let repo = api.model(source.to_string());
    let config = repo.get("config.json").map_err(|e| hub_error("config.json", e.to_string()))?;
    repo.get("tokenizer.json").map_err(|e| hub_error("tokenizer.json", e.to_string()))?;
    // generation_config.json is optional in many repos.
    let _ = repo.get("generation_config.json");
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            for shard in shard_names(&index)? {
                repo.get(&shard).map_err(|e| hub_error(&shard, e.to_string()))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors").map_err(|e| hub_error("model.safetensors", e.to_string()))?;
        }
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| hub_error("config.json", "cached file has no parent directory".into()))
}

fn read_to_string(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path)
        .map_err(|e| LoadError::Read { path: path.display().to_string(), message: e.to_string() })
}

/// The distinct shard file names listed in a `model.safetensors.index.json`, sorted.
fn shard_names(index_path: &Path) -> Result<Vec<String>, LoadError> {
    let text = read_to_string(index_path)?;
    let index: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| LoadError::Read { path: index_path.display().to_string(), message: e.to_string() })?;
    let map = index.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| LoadError::Read {
        path: index_path.display().to_string(),
        message: "no weight_map object".into(),
    })?;
    let mut names: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// The safetensors files holding the weights of the model in `dir`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        return Ok(shard_names(&index)?.into_iter().map(|name| dir.join(name)).collect());
    }
    Err(LoadError::NoWeights { dir: dir.display().to_string() })
}

/// Reads every weight of the model in `dir`, converted to f32 on `device`.
pub fn load_weights(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>, LoadError> {
    let mut weights = HashMap::new();
    for file in weight_files(dir)? {
        // Mapped rather than read: the tensors copy straight from the page cache instead of
        // from a second, freshly faulted buffer of the file's size (several seconds per GB
        // on a VM). SAFETY: the map is read-only and dropped once copied; tangle replaces
        // model files only by renaming new ones into place, never by writing through them.
        let mapped = unsafe { candle_core::safetensors::MmapedSafetensors::new(&file)? };
        for (name, _) in mapped.tensors() {
            let tensor = mapped.load(&name, device)?;
            weights.insert(name, tensor.to_dtype(DType::F32)?);
        }
    }
    Ok(weights)
}

/// Builds the model from in-memory weights. Returns the model and its trainable variables.
pub fn build_model(
    config: &ModelConfig,
    weights: HashMap<String, Tensor>,
    mode: &FinetuneMode,
    seed: u64,
    device: &Device,
) -> Result<(QwenModel, VarMap), LoadError> {
    match mode {
        FinetuneMode::Full => {
            let varmap = VarMap::new();
            {
                let mut data =
                    varmap.data().lock().map_err(|_| candle_core::Error::Msg("varmap lock poisoned".into()))?;
                for (name, tensor) in weights {
                    data.insert(name, Var::from_tensor(&tensor)?);
                }
            }
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
            let model = QwenModel::new(config, vb, None)?;
            Ok((model, varmap))
        }
        FinetuneMode::Lora(lora) => {
            let adapters = init_lora_varmap(config, lora, seed, device)?;
            let vb = VarBuilder::from_tensors(weights, DType::F32, device);
            let lora_vb = VarBuilder::from_varmap(&adapters, DType::F32, device);
            let model = QwenModel::new(config, vb, Some((lora, lora_vb)))?;
            Ok((model, adapters))
        }
        FinetuneMode::Frozen => {
            let vb = VarBuilder::from_tensors(weights, DType::F32, device);
            Ok((QwenModel::new(config, vb, None)?, VarMap::new()))
        }
    }
}

/// Loads config, tokenizer and weights from a local directory or hub id.
pub fn load_model(source: &str, mode: &FinetuneMode, seed: u64, device: &Device) -> Result<LoadedModel, LoadError> {
    let dir = resolve_model_dir(source)?;
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let tokenizer = ChatTokenizer::from_file(&dir.join("tokenizer.json"))?;
    let weights = load_weights(&dir, device)?;
    let (model, trainable) = build_model(&config, weights, mode, seed, device)?;
    Ok(LoadedModel { config, model, trainable, tokenizer, dir })
}

/// Writes a Hugging Face model directory: config.json, model.safetensors (LoRA merged),
/// tokenizer.json and generation_config.json (copied from `generation_config` when given,
/// else derived from the config's bos/eos ids).
pub fn save_model_dir(
    model: &QwenModel,
    tokenizer: &ChatTokenizer,
    out_dir: &Path,
    generation_config: Option<&serde_json::Value>,
) -> Result<(), LoadError> {
    std::fs::create_dir_all(out_dir)
        .map_err(|e| LoadError::Write { path: out_dir.display().to_string(), message: e.to_string() })?;
    model.config().save(&out_dir.join("config.json"))?;
    let weights = model.export_weights()?;
    let weights_file = out_dir.join("model.safetensors");
    candle_core::safetensors::save(&weights, &weights_file)?;
    crate::fsutil::set_usual_permissions(&weights_file)
        .map_err(|e| LoadError::Write { path: weights_file.display().to_string(), message: e.to_string() })?;
    tokenizer.save(&out_dir.join("tokenizer.json"))?;
    let generation = match generation_config {
        Some(value) => value.clone(),
        None => {
            let extra = &model.config().extra;
            serde_json::json!({
                "bos_token_id": extra.get("bos_token_id").cloned().unwrap_or(serde_json::Value::Null),
                "eos_token_id": extra.get("eos_token_id").cloned()
                    .unwrap_or(serde_json::Value::from(tokenizer.im_end_id())),
                "do_sample": false
            })
        }
    };
    let path = out_dir.join("generation_config.json");
    let text = serde_json::to_string_pretty(&generation).map_err(ConfigError::Serialize)?;
    std::fs::write(&path, text)
        .map_err(|e| LoadError::Write { path: path.display().to_string(), message: e.to_string() })
}

/// The device for a spec string: `cpu`, `cuda`, `cuda:N` or `auto` (CUDA device 0 when
/// this build has the `cuda` feature and a GPU answers, else CPU).
pub fn select_device(spec: &str) -> Result<Device, LoadError> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        "cuda" => Ok(Device::new_cuda(0)?),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => Ok(Device::new_cuda(ordinal)?),
            _ => Err(LoadError::UnknownDevice(other.to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs() {
        assert!(select_device("cpu").unwrap().is_cpu());
        // Without the cuda feature, auto falls back to CPU and cuda is an error.
        #[cfg(not(feature = "cuda"))]
        {
            assert!(select_device("auto").unwrap().is_cpu());
            assert!(select_device("cuda:0").is_err());
        }
        assert!(select_device("tpu").is_err());
    }
}
