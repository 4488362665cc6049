//! The tensor inventory a config implies: every name and shape of a Kimi Linear checkpoint, in
//! the order the HF modules define them (spec §3). [`expected_tensors`] is the single source of
//! truth for validation, for the writer's tests and for synthetic checkpoints.

use kl_config::{Mixer, Mlp, ModelConfig};

use crate::tensor::Dtype;

/// One tensor a config requires: its checkpoint name, PyTorch shape and the dtype a synthetic
/// checkpoint stores it in (F32 for `A_log`, `dt_bias` and `e_score_correction_bias`, BF16
/// otherwise — the layout of the golden tiny checkpoint; a real checkpoint may differ, and
/// loading always honours the file's own dtype).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Checkpoint name.
    pub name: String,
    /// Shape, `[out, in]` for linear weights.
    pub shape: Vec<usize>,
    /// Storage dtype.
    pub dtype: Dtype,
}

impl TensorSpec {
    /// A spec with the default dtype for its name.
    pub fn new(name: impl Into<String>, shape: Vec<usize>) -> TensorSpec {
        let name = name.into();
        let f32_names = ["A_log", "dt_bias", "e_score_correction_bias"];
        let dtype = if f32_names.iter().any(|s| name.ends_with(s)) {
            Dtype::F32
        } else {
            Dtype::BF16
        };
        TensorSpec { name, shape, dtype }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Stored size in bytes.
    pub fn nbytes(&self) -> u64 {
        self.numel() as u64 * self.dtype.size() as u64
    }
}

/// Every tensor `cfg` requires, in module order: embeddings, then each layer (norms, token mixer,
/// channel mixer), then the final norm and `lm_head` (absent when `tie_word_embeddings`).
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let h = cfg.hidden;
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>| out.push(TensorSpec::new(name, shape));
    push("model.embed_tokens.weight".into(), vec![cfg.vocab_size, h]);
    for (i, layer) in cfg.layers.iter().enumerate() {
        let p = format!("model.layers.{i}.");
        push(format!("{p}input_layernorm.weight"), vec![h]);
        push(format!("{p}post_attention_layernorm.weight"), vec![h]);
        let a = format!("{p}self_attn.");
        match layer.mixer {
            Mixer::Kda => {
                let (hk, k, w) = (cfg.kda.num_heads, cfg.kda.head_dim, cfg.kda.conv_kernel);
                let pw = cfg.kda.proj();
                for x in ["q", "k", "v"] {
                    push(format!("{a}{x}_proj.weight"), vec![pw, h]);
                }
                for x in ["q", "k", "v"] {
                    push(format!("{a}{x}_conv1d.weight"), vec![pw, 1, w]);
                }
                push(format!("{a}A_log"), vec![1, 1, hk, 1]);
                push(format!("{a}dt_bias"), vec![pw]);
                push(format!("{a}f_a_proj.weight"), vec![k, h]);
                push(format!("{a}f_b_proj.weight"), vec![pw, k]);
                push(format!("{a}b_proj.weight"), vec![hk, h]);
                push(format!("{a}g_a_proj.weight"), vec![k, h]);
                push(format!("{a}g_b_proj.weight"), vec![pw, k]);
                push(format!("{a}o_norm.weight"), vec![k]);
                push(format!("{a}o_proj.weight"), vec![h, pw]);
            }
            Mixer::Mla => {
                let m = &cfg.mla;
                let q_out = m.num_heads * m.qk_head();
                match m.q_lora_rank {
                    None => push(format!("{a}q_proj.weight"), vec![q_out, h]),
                    Some(rq) => {
                        push(format!("{a}q_a_proj.weight"), vec![rq, h]);
                        push(format!("{a}q_a_layernorm.weight"), vec![rq]);
                        push(format!("{a}q_b_proj.weight"), vec![q_out, rq]);
                    }
                }
                push(
                    format!("{a}kv_a_proj_with_mqa.weight"),
                    vec![m.kv_lora_rank + m.qk_rope, h],
                );
                push(format!("{a}kv_a_layernorm.weight"), vec![m.kv_lora_rank]);
                push(
                    format!("{a}kv_b_proj.weight"),
                    vec![m.num_heads * (m.qk_nope + m.v_head), m.kv_lora_rank],
                );
                push(format!("{a}o_proj.weight"), vec![h, m.num_heads * m.v_head]);
            }
        }
        match (layer.mlp, cfg.moe.as_ref()) {
            (Mlp::Moe, Some(moe)) => {
                let b = format!("{p}block_sparse_moe.");
                let (e, we) = (moe.num_experts, moe.expert_width);
                push(format!("{b}gate.weight"), vec![e, h]);
                push(format!("{b}gate.e_score_correction_bias"), vec![e]);
                for j in 0..e {
                    push(format!("{b}experts.{j}.w1.weight"), vec![we, h]);
                    push(format!("{b}experts.{j}.w3.weight"), vec![we, h]);
                    push(format!("{b}experts.{j}.w2.weight"), vec![h, we]);
                }
                if moe.num_shared > 0 {
                    let ws = we * moe.num_shared;
                    push(format!("{b}shared_experts.gate_proj.weight"), vec![ws, h]);
                    push(format!("{b}shared_experts.up_proj.weight"), vec![ws, h]);
                    push(format!("{b}shared_experts.down_proj.weight"), vec![h, ws]);
                }
            }
            // ModelConfig only marks a layer MoE when `moe` is Some; a dense layer otherwise.
            _ => {
                let i_w = cfg.intermediate;
                push(format!("{p}mlp.gate_proj.weight"), vec![i_w, h]);
                push(format!("{p}mlp.up_proj.weight"), vec![i_w, h]);
                push(format!("{p}mlp.down_proj.weight"), vec![h, i_w]);
            }
        }
    }
    push("model.norm.weight".into(), vec![h]);
    if !cfg.tie_word_embeddings {
        push("lm_head.weight".into(), vec![cfg.vocab_size, h]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kl_config::presets;

    #[test]
    fn real_model_inventory_counts() {
        let cfg = ModelConfig::from_raw(presets::kimi_linear_48b_a3b()).unwrap();
        let specs = expected_tensors(&cfg);
        assert_eq!(specs.len(), 20_493);
        let params: u64 = specs.iter().map(|s| s.numel() as u64).sum();
        assert_eq!(params, 49_122_681_728);
        let names: std::collections::HashSet<_> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names.len(), specs.len(), "names are unique");
    }

    #[test]
    fn default_dtypes() {
        let cfg = ModelConfig::from_raw(presets::tiny()).unwrap();
        for s in expected_tensors(&cfg) {
            let f32_expected = s.name.ends_with("A_log")
                || s.name.ends_with("dt_bias")
                || s.name.ends_with("e_score_correction_bias");
            assert_eq!(s.dtype == Dtype::F32, f32_expected, "{}", s.name);
        }
    }

    #[test]
    fn q_lora_and_tied_variants() {
        let mut raw = presets::tiny();
        raw.q_lora_rank = Some(24);
        raw.tie_word_embeddings = true;
        let cfg = ModelConfig::from_raw(raw).unwrap();
        let specs = expected_tensors(&cfg);
        let find = |n: &str| specs.iter().find(|s| s.name == n).map(|s| s.shape.clone());
        assert_eq!(
            find("model.layers.3.self_attn.q_a_proj.weight"),
            Some(vec![24, 128])
        );
        assert_eq!(
            find("model.layers.3.self_attn.q_a_layernorm.weight"),
            Some(vec![24])
        );
        assert_eq!(
            find("model.layers.3.self_attn.q_b_proj.weight"),
            Some(vec![4 * 48, 24])
        );
        assert_eq!(find("model.layers.3.self_attn.q_proj.weight"), None);
        assert_eq!(find("lm_head.weight"), None);
    }
}
