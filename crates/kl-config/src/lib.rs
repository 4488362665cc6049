//! # kl-config — the model configuration, parsed once and validated once
//!
//! A Kimi Linear checkpoint describes itself in `config.json` (the HF `KimiLinearConfig`; field names
//! as in the released `Kimi-Linear-48B-A3B-Instruct`). This crate reads that file in two stages, the
//! way ripgrep separates raw flags from validated arguments:
//!
//! 1. [`RawConfig`] is a serde mirror of the JSON. Missing required fields and wrong JSON types are
//!    reported by serde with the field name, and we prefix the file path.
//! 2. [`ModelConfig`] is the validated form: every layer's token mixer ([`Mixer::Kda`] or
//!    [`Mixer::Mla`]) and channel mixer ([`Mlp::Dense`] or [`Mlp::Moe`]) is derived once, together
//!    with the dimensions every later stage needs. A config the engine cannot run (RoPE in MLA,
//!    a router activation other than sigmoid, layer indices out of range, …) is refused here with a
//!    [`ConfigError`] naming the field and the supported values, so no later stage has to re-check.
//!
//! Conventions taken from the reference (see `../shared/docs/kimi-linear-spec.md` §1–§2):
//! `linear_attn_config.kda_layers` and `full_attn_layers` are **1-based**; a layer is KDA when its
//! 1-based index is in `kda_layers`, MLA otherwise. A layer's MLP is MoE when `num_experts` is set,
//! `i >= first_k_dense_replace` and `i % moe_layer_freq == 0` (0-based `i`), dense otherwise.
//!
//! [`presets`] holds named configurations (`tiny`, `mini`, `kimi-linear-48b-a3b`) used by `synth`
//! and the planner.
#![deny(missing_docs)]

pub mod presets;

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Why a configuration cannot be used. Every variant names the file or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Io {
        /// The path that was read.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text is not JSON, or a field is missing or has the wrong JSON type.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The path (or `<memory>`).
        path: String,
        /// serde's message, which names the field and the line.
        message: String,
    },
    /// A field has a value the engine does not support.
    #[error("config field `{field}` = {value}: {expected}")]
    Unsupported {
        /// The JSON field (dotted path for nested fields).
        field: String,
        /// The value found.
        value: String,
        /// What is supported.
        expected: String,
    },
}

fn unsupported(
    field: &str,
    value: impl std::fmt::Debug,
    expected: impl Into<String>,
) -> ConfigError {
    ConfigError::Unsupported {
        field: field.to_string(),
        value: format!("{value:?}"),
        expected: expected.into(),
    }
}

/// `eos_token_id` may be one id or a list of ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(i64),
    /// Several ids.
    Many(Vec<i64>),
}

impl TokenIds {
    /// All ids as a vector.
    pub fn to_vec(&self) -> Vec<i64> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// `linear_attn_config` of the checkpoint's config.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawLinearAttnConfig {
    /// 1-based indices of the MLA (full attention) layers.
    #[serde(default)]
    pub full_attn_layers: Vec<i64>,
    /// 1-based indices of the KDA layers.
    pub kda_layers: Vec<i64>,
    /// KDA head dimension (dk = dv).
    pub head_dim: usize,
    /// KDA heads.
    pub num_heads: usize,
    /// Depthwise causal conv kernel width.
    pub short_conv_kernel_size: usize,
}

/// Serde mirror of `config.json`: exactly the field names of HF `KimiLinearConfig`.
///
/// Unknown fields are ignored (checkpoints carry metadata such as `auto_map`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawConfig {
    /// HF architecture names; must contain `KimiLinearForCausalLM` when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// `kimi_linear` when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    /// Vocabulary rows of `embed_tokens` / `lm_head`.
    pub vocab_size: usize,
    /// Residual width D.
    pub hidden_size: usize,
    /// Width of the dense SwiGLU MLP.
    pub intermediate_size: usize,
    /// Width of one routed expert (and of each shared expert).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe_intermediate_size: Option<usize>,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// MLA heads.
    pub num_attention_heads: usize,
    /// Only meaningful for expanded MLA; must equal `num_attention_heads` when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Dead field in Kimi Linear (kept for round trips).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Activation of every MLP; only `silu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Initializer std (unused at inference).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initializer_range: Option<f64>,
    /// RMSNorm epsilon of every norm except `kv_a_layernorm`.
    pub rms_norm_eps: f64,
    /// `null` → direct `q_proj`; a number → `q_a_proj` / `q_a_layernorm` / `q_b_proj`.
    pub q_lora_rank: Option<usize>,
    /// MLA latent width R.
    pub kv_lora_rank: usize,
    /// MLA per-head key part computed from the latent.
    pub qk_nope_head_dim: usize,
    /// MLA shared key part (unrotated under NoPE).
    pub qk_rope_head_dim: usize,
    /// MLA per-head value width.
    pub v_head_dim: usize,
    /// Must be `true`: Kimi Linear's MLA has no rotary embedding.
    #[serde(default)]
    pub mla_use_nope: bool,
    /// KDA dimensions and the layer pattern.
    pub linear_attn_config: RawLinearAttnConfig,
    /// Routed experts; `null`/absent → every MLP is dense.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts: Option<usize>,
    /// Experts chosen per token (top-k).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts_per_token: Option<usize>,
    /// Shared experts (their width is `moe_intermediate_size × num_shared_experts`).
    #[serde(default)]
    pub num_shared_experts: usize,
    /// Renormalise the top-k weights to sum to one.
    #[serde(default = "default_true")]
    pub moe_renormalize: bool,
    /// Router score function; only `sigmoid`.
    #[serde(default = "default_sigmoid")]
    pub moe_router_activation_func: String,
    /// Multiplier on the final top-k weights.
    #[serde(default = "default_one")]
    pub routed_scaling_factor: f64,
    /// The first this-many layers use the dense MLP.
    #[serde(default)]
    pub first_k_dense_replace: usize,
    /// MoE every this-many layers (after the dense prefix).
    #[serde(default = "default_one_usize")]
    pub moe_layer_freq: usize,
    /// Group-limited routing switch.
    #[serde(default)]
    pub use_grouped_topk: bool,
    /// Expert groups for group-limited routing.
    #[serde(default = "default_one_usize")]
    pub num_expert_group: usize,
    /// Groups kept by group-limited routing.
    #[serde(default = "default_one_usize")]
    pub topk_group: usize,
    /// Multi-token-prediction layers; must be 0.
    #[serde(default)]
    pub num_nextn_predict_layers: usize,
    /// Share `embed_tokens` and `lm_head`.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<i64>,
    /// End-of-sequence id(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<i64>,
    /// Longest context the model was trained for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_max_length: Option<usize>,
    /// Unused under NoPE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// Must be null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// Unused flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_cache: Option<bool>,
    /// Stored dtype (informational; each tensor's own dtype wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
}

fn default_act() -> String {
    "silu".into()
}
fn default_sigmoid() -> String {
    "sigmoid".into()
}
fn default_true() -> bool {
    true
}
fn default_one() -> f64 {
    1.0
}
fn default_one_usize() -> usize {
    1
}

/// The token mixer of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Mixer {
    /// Kimi Delta Attention (linear attention, fixed-size state).
    Kda,
    /// Multi-head Latent Attention (latent cache grows with the context).
    Mla,
}

/// The channel mixer of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Mlp {
    /// SwiGLU of width `intermediate_size` under `mlp.`.
    Dense,
    /// Routed experts plus shared experts under `block_sparse_moe.`.
    Moe,
}

/// Kind of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LayerKind {
    /// Token mixer.
    pub mixer: Mixer,
    /// Channel mixer.
    pub mlp: Mlp,
}

/// KDA dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct KdaDims {
    /// Heads (Hk).
    pub num_heads: usize,
    /// Head dim K (= V).
    pub head_dim: usize,
    /// Conv kernel width W.
    pub conv_kernel: usize,
}

impl KdaDims {
    /// Projection width P = Hk·K.
    pub fn proj(&self) -> usize {
        self.num_heads * self.head_dim
    }
}

/// MLA dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MlaDims {
    /// Heads.
    pub num_heads: usize,
    /// `q_lora_rank` (None → direct `q_proj`).
    pub q_lora_rank: Option<usize>,
    /// Latent width R.
    pub kv_lora_rank: usize,
    /// Per-head key part from the latent.
    pub qk_nope: usize,
    /// Shared key part.
    pub qk_rope: usize,
    /// Per-head value width.
    pub v_head: usize,
}

impl MlaDims {
    /// Per-head query width `qk_nope + qk_rope`.
    pub fn qk_head(&self) -> usize {
        self.qk_nope + self.qk_rope
    }
    /// Values cached per token per MLA layer: `kv_lora_rank + qk_rope`.
    pub fn latent_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope
    }
    /// Softmax scale `(qk_nope + qk_rope)^-1/2`.
    pub fn softmax_scale(&self) -> f32 {
        (self.qk_head() as f32).powf(-0.5)
    }
}

/// MoE dimensions and routing rules.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MoeDims {
    /// Routed experts E.
    pub num_experts: usize,
    /// Top-k A.
    pub top_k: usize,
    /// Width of one expert.
    pub expert_width: usize,
    /// Shared experts (fused into one SwiGLU of width `expert_width × num_shared`).
    pub num_shared: usize,
    /// Renormalise top-k weights.
    pub renormalize: bool,
    /// Multiplier on the final weights.
    pub routed_scaling_factor: f32,
    /// Expert groups (1 = no group limit).
    pub num_expert_group: usize,
    /// Groups kept.
    pub topk_group: usize,
}

/// A validated configuration with every derived quantity the engine needs.
#[derive(Debug, Clone, Serialize)]
pub struct ModelConfig {
    /// The raw mirror it came from.
    pub raw: RawConfig,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual width D.
    pub hidden: usize,
    /// Dense MLP width.
    pub intermediate: usize,
    /// RMSNorm eps.
    pub rms_norm_eps: f32,
    /// eps of `kv_a_layernorm` (1e-6, as the remote code and transformers).
    pub kv_norm_eps: f32,
    /// One entry per layer.
    pub layers: Vec<LayerKind>,
    /// KDA dims.
    pub kda: KdaDims,
    /// MLA dims.
    pub mla: MlaDims,
    /// MoE dims (None when no layer is MoE).
    pub moe: Option<MoeDims>,
    /// Tied embeddings.
    pub tie_word_embeddings: bool,
    /// End-of-sequence ids from the config.
    pub eos_token_ids: Vec<i64>,
}

impl RawConfig {
    /// Parse JSON text; `origin` names the source in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })
    }

    /// Pretty JSON in the checkpoint's field names.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("RawConfig always serializes")
    }
}

impl ModelConfig {
    /// Read and validate `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parse and validate JSON text.
    pub fn from_json(text: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::from_raw(RawConfig::from_json(text, origin)?)
    }

    /// Validate a raw config and derive layer kinds and dimensions.
    pub fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        if let Some(arch) = &raw.architectures {
            if !arch.iter().any(|a| a == "KimiLinearForCausalLM") {
                return Err(unsupported(
                    "architectures",
                    arch,
                    "[\"KimiLinearForCausalLM\"]",
                ));
            }
        }
        if let Some(mt) = &raw.model_type {
            if mt != "kimi_linear" {
                return Err(unsupported("model_type", mt, "\"kimi_linear\""));
            }
        }
        let positive = |field: &str, v: usize| -> Result<(), ConfigError> {
            if v == 0 {
                Err(unsupported(field, v, "a positive integer"))
            } else {
                Ok(())
            }
        };
        positive("vocab_size", raw.vocab_size)?;
        positive("hidden_size", raw.hidden_size)?;
        positive("num_hidden_layers", raw.num_hidden_layers)?;
        positive("num_attention_heads", raw.num_attention_heads)?;
        positive("kv_lora_rank", raw.kv_lora_rank)?;
        positive("qk_nope_head_dim", raw.qk_nope_head_dim)?;
        positive("v_head_dim", raw.v_head_dim)?;
        let la = &raw.linear_attn_config;
        positive("linear_attn_config.head_dim", la.head_dim)?;
        positive("linear_attn_config.num_heads", la.num_heads)?;
        positive(
            "linear_attn_config.short_conv_kernel_size",
            la.short_conv_kernel_size,
        )?;
        if raw.hidden_act != "silu" {
            return Err(unsupported("hidden_act", &raw.hidden_act, "\"silu\""));
        }
        if !raw.mla_use_nope {
            return Err(unsupported(
                "mla_use_nope",
                raw.mla_use_nope,
                "true (Kimi Linear's MLA layers use no positional encoding; RoPE is not implemented)",
            ));
        }
        if let Some(rs) = &raw.rope_scaling {
            if !rs.is_null() {
                return Err(unsupported("rope_scaling", rs, "null"));
            }
        }
        if raw.num_nextn_predict_layers != 0 {
            return Err(unsupported(
                "num_nextn_predict_layers",
                raw.num_nextn_predict_layers,
                "0 (multi-token prediction layers are not supported)",
            ));
        }
        if let Some(kvh) = raw.num_key_value_heads {
            if kvh != raw.num_attention_heads {
                return Err(unsupported(
                    "num_key_value_heads",
                    kvh,
                    format!("equal to num_attention_heads ({})", raw.num_attention_heads),
                ));
            }
        }
        if !(raw.rms_norm_eps > 0.0 && raw.rms_norm_eps < 1.0) {
            return Err(unsupported(
                "rms_norm_eps",
                raw.rms_norm_eps,
                "a value in (0, 1)",
            ));
        }
        if let Some(r) = raw.q_lora_rank {
            positive("q_lora_rank", r)?;
        }

        let n = raw.num_hidden_layers;
        let check_indices = |field: &str, list: &[i64]| -> Result<Vec<usize>, ConfigError> {
            let mut out = Vec::with_capacity(list.len());
            for &i in list {
                if i < 1 || i as usize > n {
                    return Err(unsupported(
                        field,
                        list,
                        format!(
                            "1-based layer indices in 1..={n} (num_hidden_layers = {n}); found {i}"
                        ),
                    ));
                }
                if out.contains(&((i - 1) as usize)) {
                    return Err(unsupported(
                        field,
                        list,
                        format!("distinct indices; {i} appears twice"),
                    ));
                }
                out.push((i - 1) as usize);
            }
            Ok(out)
        };
        let kda = check_indices("linear_attn_config.kda_layers", &la.kda_layers)?;
        let full = check_indices("linear_attn_config.full_attn_layers", &la.full_attn_layers)?;
        if let Some(i) = kda.iter().find(|i| full.contains(i)) {
            return Err(unsupported(
                "linear_attn_config.full_attn_layers",
                &la.full_attn_layers,
                format!("no index also in kda_layers; layer {} is in both", i + 1),
            ));
        }

        let moe = match raw.num_experts {
            None | Some(0) => None,
            Some(e) => {
                let top_k = raw.num_experts_per_token.ok_or_else(|| {
                    unsupported(
                        "num_experts_per_token",
                        "missing",
                        "required when num_experts is set",
                    )
                })?;
                if top_k == 0 || top_k > e {
                    return Err(unsupported(
                        "num_experts_per_token",
                        top_k,
                        format!("1..={e} (num_experts)"),
                    ));
                }
                let width = raw.moe_intermediate_size.ok_or_else(|| {
                    unsupported(
                        "moe_intermediate_size",
                        "missing",
                        "required when num_experts is set",
                    )
                })?;
                positive("moe_intermediate_size", width)?;
                positive("moe_layer_freq", raw.moe_layer_freq)?;
                if raw.moe_router_activation_func != "sigmoid" {
                    return Err(unsupported(
                        "moe_router_activation_func",
                        &raw.moe_router_activation_func,
                        "\"sigmoid\"",
                    ));
                }
                let (groups, topk_group) = if raw.use_grouped_topk {
                    (raw.num_expert_group, raw.topk_group)
                } else {
                    (1, 1)
                };
                if groups == 0 || e % groups != 0 {
                    return Err(unsupported(
                        "num_expert_group",
                        groups,
                        format!("a positive divisor of num_experts ({e})"),
                    ));
                }
                if topk_group == 0 || topk_group > groups {
                    return Err(unsupported(
                        "topk_group",
                        topk_group,
                        format!("1..={groups} (num_expert_group)"),
                    ));
                }
                if groups > 1 && (e / groups < 2 || top_k > topk_group * (e / groups)) {
                    return Err(unsupported(
                        "num_expert_group",
                        groups,
                        "groups of at least 2 experts whose kept groups hold at least num_experts_per_token experts",
                    ));
                }
                if !(raw.routed_scaling_factor.is_finite() && raw.routed_scaling_factor > 0.0) {
                    return Err(unsupported(
                        "routed_scaling_factor",
                        raw.routed_scaling_factor,
                        "a positive finite number",
                    ));
                }
                Some(MoeDims {
                    num_experts: e,
                    top_k,
                    expert_width: width,
                    num_shared: raw.num_shared_experts,
                    renormalize: raw.moe_renormalize,
                    routed_scaling_factor: raw.routed_scaling_factor as f32,
                    num_expert_group: groups,
                    topk_group,
                })
            }
        };

        let layers = (0..n)
            .map(|i| LayerKind {
                mixer: if kda.contains(&i) {
                    Mixer::Kda
                } else {
                    Mixer::Mla
                },
                mlp: if moe.is_some()
                    && i >= raw.first_k_dense_replace
                    && i % raw.moe_layer_freq == 0
                {
                    Mlp::Moe
                } else {
                    Mlp::Dense
                },
            })
            .collect::<Vec<_>>();
        if layers.iter().any(|l| l.mlp == Mlp::Dense) {
            positive("intermediate_size", raw.intermediate_size)?;
        }

        Ok(ModelConfig {
            vocab_size: raw.vocab_size,
            hidden: raw.hidden_size,
            intermediate: raw.intermediate_size,
            rms_norm_eps: raw.rms_norm_eps as f32,
            kv_norm_eps: 1e-6,
            kda: KdaDims {
                num_heads: la.num_heads,
                head_dim: la.head_dim,
                conv_kernel: la.short_conv_kernel_size,
            },
            mla: MlaDims {
                num_heads: raw.num_attention_heads,
                q_lora_rank: raw.q_lora_rank,
                kv_lora_rank: raw.kv_lora_rank,
                qk_nope: raw.qk_nope_head_dim,
                qk_rope: raw.qk_rope_head_dim,
                v_head: raw.v_head_dim,
            },
            moe,
            tie_word_embeddings: raw.tie_word_embeddings,
            eos_token_ids: raw
                .eos_token_id
                .as_ref()
                .map(|e| e.to_vec())
                .unwrap_or_default(),
            layers,
            raw,
        })
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Number of KDA layers.
    pub fn num_kda_layers(&self) -> usize {
        self.layers.iter().filter(|l| l.mixer == Mixer::Kda).count()
    }

    /// Number of MLA layers.
    pub fn num_mla_layers(&self) -> usize {
        self.layers.iter().filter(|l| l.mixer == Mixer::Mla).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_config_layer_map() {
        let cfg = ModelConfig::from_raw(presets::kimi_linear_48b_a3b()).unwrap();
        let mla: Vec<usize> = (0..27)
            .filter(|&i| cfg.layers[i].mixer == Mixer::Mla)
            .collect();
        assert_eq!(mla, vec![3, 7, 11, 15, 19, 23, 26]);
        assert_eq!(cfg.layers[0].mlp, Mlp::Dense);
        assert!(cfg.layers[1..].iter().all(|l| l.mlp == Mlp::Moe));
        assert_eq!(cfg.mla.latent_width(), 576);
        assert_eq!(cfg.eos_token_ids, vec![163586]);
    }

    #[test]
    fn refuses_out_of_range_layer() {
        let mut raw = presets::tiny();
        raw.linear_attn_config.kda_layers = vec![0, 1, 2];
        let e = ModelConfig::from_raw(raw).unwrap_err().to_string();
        assert!(
            e.contains("linear_attn_config.kda_layers") && e.contains("1..=4"),
            "{e}"
        );
    }

    #[test]
    fn refuses_rope() {
        let mut raw = presets::tiny();
        raw.mla_use_nope = false;
        let e = ModelConfig::from_raw(raw).unwrap_err().to_string();
        assert!(e.contains("mla_use_nope"), "{e}");
    }

    #[test]
    fn missing_field_is_named() {
        let mut v: serde_json::Value = serde_json::from_str(&presets::tiny().to_json()).unwrap();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelConfig::from_json(&v.to_string(), "x/config.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("hidden_size") && e.contains("x/config.json"),
            "{e}"
        );
    }

    #[test]
    fn not_json() {
        let e = ModelConfig::from_json("{not json", "c.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.json"), "{e}");
    }
}
