//! Named configurations.
//!
//! - `tiny`: the dimensions of the golden tiny model (`../shared/golden/kimi_linear_tiny`).
//! - `mini`: a ~0.5 B-parameter model with the real layer pattern, for benchmarks and demos.
//! - `kimi-linear-48b-a3b`: the released `Kimi-Linear-48B-A3B-Instruct` config, verbatim values.

use crate::{RawConfig, RawLinearAttnConfig, TokenIds};

/// Names accepted by [`by_name`].
pub const NAMES: &[&str] = &["tiny", "mini", "kimi-linear-48b-a3b"];

/// A preset by name, or `None`.
pub fn by_name(name: &str) -> Option<RawConfig> {
    match name {
        "tiny" => Some(tiny()),
        "mini" => Some(mini()),
        "kimi-linear-48b-a3b" | "kimi-linear-48b" | "48b" => Some(kimi_linear_48b_a3b()),
        _ => None,
    }
}

#[allow(clippy::too_many_arguments)]
fn base(
    vocab: usize,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    mla_layers_1based: Vec<i64>,
    kda_heads: usize,
    kda_head_dim: usize,
    mla_heads: usize,
    kv_lora_rank: usize,
    nope: usize,
    rope: usize,
    v: usize,
    experts: usize,
    top_k: usize,
    expert_width: usize,
) -> RawConfig {
    let kda_layers = (1..=layers as i64)
        .filter(|i| !mla_layers_1based.contains(i))
        .collect();
    RawConfig {
        architectures: Some(vec!["KimiLinearForCausalLM".into()]),
        model_type: Some("kimi_linear".into()),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: intermediate,
        moe_intermediate_size: Some(expert_width),
        num_hidden_layers: layers,
        num_attention_heads: mla_heads,
        num_key_value_heads: Some(mla_heads),
        head_dim: Some(hidden / mla_heads),
        hidden_act: "silu".into(),
        initializer_range: Some(0.02),
        rms_norm_eps: 1e-5,
        q_lora_rank: None,
        kv_lora_rank,
        qk_nope_head_dim: nope,
        qk_rope_head_dim: rope,
        v_head_dim: v,
        mla_use_nope: true,
        linear_attn_config: RawLinearAttnConfig {
            full_attn_layers: mla_layers_1based,
            kda_layers,
            head_dim: kda_head_dim,
            num_heads: kda_heads,
            short_conv_kernel_size: 4,
        },
        num_experts: Some(experts),
        num_experts_per_token: Some(top_k),
        num_shared_experts: 1,
        moe_renormalize: true,
        moe_router_activation_func: "sigmoid".into(),
        routed_scaling_factor: 2.446,
        first_k_dense_replace: 1,
        moe_layer_freq: 1,
        use_grouped_topk: true,
        num_expert_group: 1,
        topk_group: 1,
        num_nextn_predict_layers: 0,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_id: Some(TokenIds::One(2)),
        pad_token_id: Some(0),
        model_max_length: Some(1_048_576),
        rope_theta: Some(10000.0),
        rope_scaling: None,
        use_cache: Some(true),
        dtype: Some("bfloat16".into()),
    }
}

/// The golden tiny model's config.
pub fn tiny() -> RawConfig {
    let mut c = base(
        512,
        128,
        192,
        4,
        vec![4],
        3,
        32,
        4,
        48,
        32,
        16,
        24,
        8,
        2,
        32,
    );
    c.head_dim = Some(32);
    c
}

/// `mini`: hidden 1024, 8 layers (MLA at 4 and 8), KDA 16×64, MLA 16 heads (R 256, nope 64,
/// rope 32, v 64), 16 experts top-4 of width 512 plus one shared, dense layer 0 of 2816, vocab 32000.
pub fn mini() -> RawConfig {
    base(
        32000,
        1024,
        2816,
        8,
        vec![4, 8],
        16,
        64,
        16,
        256,
        64,
        32,
        64,
        16,
        4,
        512,
    )
}

/// The released Kimi-Linear-48B-A3B-Instruct config.
pub fn kimi_linear_48b_a3b() -> RawConfig {
    let mut c = base(
        163_840,
        2304,
        9216,
        27,
        vec![4, 8, 12, 16, 20, 24, 27],
        32,
        128,
        32,
        512,
        128,
        64,
        128,
        256,
        8,
        1024,
    );
    c.head_dim = Some(72);
    c.bos_token_id = Some(163_584);
    c.eos_token_id = Some(TokenIds::One(163_586));
    c.pad_token_id = Some(163_839);
    c
}
