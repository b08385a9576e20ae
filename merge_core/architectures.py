"""The architecture table: for every causal-LM architecture mergekit 0.1.5 knows, which tensors a model has,
in which layer, under which names, and how a checkpoint may store them (aliases, tied heads, per-expert MoE tensors).

The one place that knows tensor naming and layer indexing; it reads no files and holds no tensors. The facts are
those of mergekit's architecture definitions (so merges agree tensor for tensor), written down here in our own form.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

from merge_core.errors import MergeConfigError


@dataclass(frozen=True)
class Weight:
    """One tensor of a model, as a name template: `{i}` is the layer index, `{n}` the number of layers.

    optional: a model may lack it (then, if every merged model lacks it, it is not written).
    aliases: other names a checkpoint may store it under (read, never written).
    tied: tensors it equals when a checkpoint leaves it out (a head tied to the embeddings).
    experts: ways to build a fused MoE tensor from per-expert tensors when a checkpoint stores those instead. Each
        way is a tuple of part templates (`{e}` is the expert index); every part is stacked over the experts
        (a new first axis) and the parts are concatenated along axis 1, as transformers v5 fuses them on loading.
    """

    name: str
    optional: bool = False
    aliases: tuple[str, ...] = ()
    tied: tuple[str, ...] = ()
    experts: tuple[tuple[str, ...], ...] = ()

    def at(self, index: int | None = None, layers: int | None = None) -> "Weight":
        """This weight with `{i}` (layer index) and `{n}` (layer count) filled in."""
        def fill(text: str) -> str:
            if "{" not in text:
                return text
            out = text.replace("{i}", str(index)) if index is not None else text
            return out.replace("{n}", str(layers)) if layers is not None else out

        return Weight(fill(self.name), self.optional, tuple(map(fill, self.aliases)), tuple(map(fill, self.tied)),
                      tuple(tuple(fill(p) for p in way) for way in self.experts))

    def renamed(self, prefix: str) -> "Weight":
        """The same weight under `prefix` (names, aliases, tied names and expert parts)."""
        return Weight(prefix + self.name, self.optional, tuple(prefix + a for a in self.aliases),
                      tuple(prefix + t for t in self.tied), tuple(tuple(prefix + p for p in way) for way in self.experts))


LayerFn = Callable[[dict, int], "tuple[Weight, ...]"]


@dataclass(frozen=True)
class Architecture:
    """A model family: the tensors before the layers, those of layer i, those after the layers.

    model_type: the config's `model_type`; names: the config's `architectures` entries it answers to.
    layers_key: the config key holding the number of layers. layer_fn: per-layer tensors that depend on the config
    (MoE models whose first layers are dense, experts counted from the config), instead of `layer`.
    """

    model_type: str
    names: tuple[str, ...]
    pre: tuple[Weight, ...]
    layer: tuple[Weight, ...]
    post: tuple[Weight, ...]
    layers_key: str = "num_hidden_layers"
    layer_fn: LayerFn | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return self.names[0]

    def num_layers(self, config: dict) -> int:
        """The layer count the config declares (its `layers_key`)."""
        for key in (self.layers_key, "num_hidden_layers", "n_layer", "num_layers"):
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        raise MergeConfigError(f"config.json has no layer count ({self.layers_key})", "config.json")

    def pre_weights(self, config: dict, layers: int | None = None) -> list[Weight]:
        n = self.num_layers(config) if layers is None else layers
        return [w.at(layers=n) for w in self.pre]

    def post_weights(self, config: dict, layers: int | None = None) -> list[Weight]:
        n = self.num_layers(config) if layers is None else layers
        return [w.at(layers=n) for w in self.post]

    def layer_weights(self, config: dict, index: int) -> list[Weight]:
        templates = self.layer_fn(config, index) if self.layer_fn is not None else self.layer
        n = self.num_layers(config)
        return [w.at(index, n) for w in templates]

    def all_weights(self, config: dict) -> list[Weight]:
        """Every tensor of a model with this config: before the layers, layer by layer, after."""
        out = self.pre_weights(config)
        for i in range(self.num_layers(config)):
            out += self.layer_weights(config, i)
        return out + self.post_weights(config)


# ---- building blocks ---------------------------------------------------------------------------------

def _opt(*names: str) -> tuple[Weight, ...]:
    return tuple(Weight(n, optional=True) for n in names)


def _req(*names: str) -> tuple[Weight, ...]:
    return tuple(Weight(n) for n in names)


def _wb(*modules: str, bias_optional: bool = False) -> tuple[Weight, ...]:
    """`module.weight` and `module.bias` for each module (the bias optional when asked)."""
    out: list[Weight] = []
    for m in modules:
        out += [Weight(f"{m}.weight"), Weight(f"{m}.bias", optional=bias_optional)]
    return tuple(out)


def _in(prefix: str, weights: Iterable[Weight]) -> tuple[Weight, ...]:
    return tuple(w.renamed(prefix) for w in weights)


QKVO = _req(*(f"self_attn.{p}_proj.weight" for p in "qkvo"))
QK_NORM = _req("self_attn.q_norm.weight", "self_attn.k_norm.weight")
GATED_MLP = _req("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
TWO_NORMS = _req("input_layernorm.weight", "post_attention_layernorm.weight")
EMBED = Weight("model.embed_tokens.weight")
FINAL_NORM = Weight("model.norm.weight")
LAYERS = "model.layers.{i}."


def _head(name: str = "lm_head.weight", tied_to: tuple[str, ...] = ("model.embed_tokens.weight",),
          optional: bool = True) -> Weight:
    """The output head: optional and read from the embeddings when a tied checkpoint leaves it out."""
    return Weight(name, optional=optional, tied=tied_to if optional else ())


HEAD = _head()
REQUIRED_HEAD = Weight("lm_head.weight")


def _decoder(model_type: str, names: tuple[str, ...], layer: tuple[Weight, ...], *, head: Weight | None = HEAD,
             post: tuple[Weight, ...] = (FINAL_NORM,), pre: tuple[Weight, ...] = (EMBED,)) -> Architecture:
    """A `model.embed_tokens` / `model.layers.{i}.` / `model.norm` decoder (the Llama layout)."""
    return Architecture(model_type, names, pre, _in(LAYERS, layer), post + ((head,) if head is not None else ()))


# Mixture-of-experts tensors as transformers v5 holds them (fused over experts), with the per-expert checkpoint
# layouts they are built from (what transformers' loading conversion does for these model types).
QWEN_MOE_EXPERTS = (
    Weight("mlp.experts.gate_up_proj",
           experts=(("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),)),
    Weight("mlp.experts.down_proj", experts=(("mlp.experts.{e}.down_proj.weight",),)),
)
MIXTRAL_EXPERTS = (
    Weight("mlp.experts.gate_up_proj", experts=(("mlp.experts.{e}.w1.weight", "mlp.experts.{e}.w3.weight"),
                                                ("block_sparse_moe.experts.{e}.w1.weight",
                                                 "block_sparse_moe.experts.{e}.w3.weight"))),
    Weight("mlp.experts.down_proj", experts=(("mlp.experts.{e}.w2.weight",),
                                             ("block_sparse_moe.experts.{e}.w2.weight",))),
    Weight("mlp.gate.weight", aliases=("block_sparse_moe.gate.weight",)),
)


def _gpt2_like(model_type: str, names: tuple[str, ...], *, aliases: bool) -> Architecture:
    """GPT-2 and GPT-BigCode: `transformer.h.{i}.`, Conv1D / Linear blocks; GPT-2 also reads prefix-less names."""
    def t(name: str) -> Weight:
        return Weight("transformer." + name, aliases=(name,) if aliases else ())

    layer = [t(f"h.{{i}}.{m}.{p}") for m in ("attn.c_attn", "attn.c_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj")
             for p in ("weight", "bias")]
    tied = ("transformer.wte.weight", "wte.weight") if aliases else ("transformer.wte.weight",)
    return Architecture(model_type, names, (t("wte.weight"), t("wpe.weight")), tuple(layer),
                        (t("ln_f.weight"), t("ln_f.bias"), _head(tied_to=tied)), layers_key="n_layer")


# ---- config-dependent layers ---------------------------------------------------------------------------

_GLM4_MOE_DENSE = (*TWO_NORMS, *GATED_MLP, *_opt("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
                   *_wb("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", bias_optional=True),
                   Weight("self_attn.o_proj.weight"))


def _glm4_moe_layer(config: dict, index: int) -> tuple[Weight, ...]:
    """Dense MLP in the first `first_k_dense_replace` layers; routed (fused) and shared experts after."""
    if index < int(config.get("first_k_dense_replace", 0)):
        return _in(LAYERS, _GLM4_MOE_DENSE)
    moe = (*QWEN_MOE_EXPERTS, *_req("mlp.gate.weight", "mlp.gate.e_score_correction_bias"),
           *_req(*(f"mlp.shared_experts.{p}_proj.weight" for p in ("gate", "up", "down"))))
    return _in(LAYERS, moe + tuple(w for w in _GLM4_MOE_DENSE if not w.name.startswith("mlp.")))


_AFMOE_LAYER = (*_req("input_layernorm.weight", "pre_mlp_layernorm.weight", "post_mlp_layernorm.weight",
                      "post_attention_layernorm.weight"),
                *QKVO, *QK_NORM, Weight("self_attn.gate_proj.weight"),
                *_opt(*(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
                      *(f"mlp.shared_experts.{p}_proj.weight" for p in ("gate", "up", "down")),
                      "mlp.expert_bias", "mlp.router.gate.weight"))


def _afmoe_layer(config: dict, index: int) -> tuple[Weight, ...]:
    """Dense or MoE layers, experts stored (and written) one by one: `mlp.experts.{e}.*_proj.weight`, optional."""
    experts = int(config.get("num_experts") or 0)
    per_expert = _opt(*(f"mlp.experts.{e}.{p}_proj.weight" for e in range(experts) for p in ("up", "gate", "down")))
    return _in(LAYERS, _AFMOE_LAYER + per_expert)


# ---- the table -----------------------------------------------------------------------------------------

ARCHITECTURES: tuple[Architecture, ...] = (
    # the Llama layout and its close relatives
    _decoder("llama", ("LlamaForCausalLM", "LLaMaForCausalLM"), TWO_NORMS + QKVO + GATED_MLP),
    _decoder("mistral", ("MistralForCausalLM",), TWO_NORMS + QKVO + GATED_MLP),
    _decoder("solar", ("SolarForCausalLM",), TWO_NORMS + QKVO + GATED_MLP,
             head=_head(tied_to=("model.lm_head.weight",))),
    _decoder("arcee", ("ArceeForCausalLM",), TWO_NORMS + QKVO + _req("mlp.up_proj.weight", "mlp.down_proj.weight")),
    _decoder("qwen2", ("Qwen2ForCausalLM",),
             TWO_NORMS + QKVO + _req(*(f"self_attn.{p}_proj.bias" for p in "qkv")) + GATED_MLP),
    _decoder("qwen3", ("Qwen3ForCausalLM",), TWO_NORMS + QKVO + QK_NORM + GATED_MLP),
    _decoder("qwen3_moe", ("Qwen3MoeForCausalLM",), TWO_NORMS + QKVO + QK_NORM + QWEN_MOE_EXPERTS
             + _req("mlp.gate.weight")),
    _decoder("mixtral", ("MixtralForCausalLM",), TWO_NORMS + QKVO + MIXTRAL_EXPERTS),
    _decoder("gemma", ("GemmaForCausalLM",), TWO_NORMS + QKVO + GATED_MLP, head=None),
    _decoder("gemma2", ("Gemma2ForCausalLM",), TWO_NORMS + _req("pre_feedforward_layernorm.weight",
                                                                 "post_feedforward_layernorm.weight")
             + QKVO + GATED_MLP),
    _decoder("gemma3_text", ("Gemma3ForCausalLM",), TWO_NORMS + _req("pre_feedforward_layernorm.weight",
                                                                      "post_feedforward_layernorm.weight")
             + QKVO + QK_NORM + GATED_MLP),
    _decoder("olmo2", ("Olmo2ForCausalLM",), _req("post_attention_layernorm.weight",
                                                  "post_feedforward_layernorm.weight") + QKVO + QK_NORM + GATED_MLP),
    # Cohere: q_norm / k_norm exist only with use_qk_norm (Command R+); mergekit requires them, here they are optional
    _decoder("cohere", ("CohereForCausalLM",), _req("input_layernorm.weight") + QKVO
             + _opt("self_attn.q_norm.weight", "self_attn.k_norm.weight") + GATED_MLP,
             head=Weight("lm_head.weight", optional=True)),
    _decoder("cohere2", ("Cohere2ForCausalLM",), _req("input_layernorm.weight") + QKVO + GATED_MLP,
             head=Weight("lm_head.weight", optional=True)),
    _decoder("granite", ("GraniteForCausalLM",),
             TWO_NORMS + _wb(*(f"self_attn.{p}_proj" for p in "qkvo"), bias_optional=True)
             + _wb(*(f"mlp.{p}_proj" for p in ("gate", "up", "down")), bias_optional=True)),
    _decoder("granitemoehybrid", ("GraniteMoeHybridForCausalLM",),
             TWO_NORMS + _req("shared_mlp.input_linear.weight", "shared_mlp.output_linear.weight",
                              "block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight",
                              "block_sparse_moe.router.layer.weight")
             + _opt(*(f"self_attn.{p}_proj.weight" for p in "qkvo"))
             + _opt(*(f"mamba.{p}" for p in ("A_log", "D", "dt_bias", "conv1d.weight", "conv1d.bias",
                                             "in_proj.weight", "out_proj.weight", "norm.weight")))),
    _decoder("glm4", ("Glm4ForCausalLM",),
             TWO_NORMS + _req("post_self_attn_layernorm.weight", "post_mlp_layernorm.weight")
             + _wb("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", bias_optional=True)
             + _req("self_attn.o_proj.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight")),
    replace(_decoder("glm4_moe", ("Glm4MoeForCausalLM",), ()), layer_fn=_glm4_moe_layer),
    replace(_decoder("afmoe", ("AfmoeForCausalLM",), ()), layer_fn=_afmoe_layer),
    _decoder("apertus", ("ApertusForCausalLM",),
             _req("attention_layernorm.weight", "feedforward_layernorm.weight") + QKVO + QK_NORM
             + _req("mlp.up_proj.weight", "mlp.down_proj.weight")
             + _req(*(f"mlp.act_fn.{p}" for p in ("alpha_p", "alpha_n", "beta", "eps")))),
    _decoder("lfm2", ("Lfm2ForCausalLM",),
             _req("operator_norm.weight", "ffn_norm.weight", *(f"feed_forward.w{k}.weight" for k in (1, 2, 3)))
             + _opt("conv.conv.weight", "conv.in_proj.weight", "conv.out_proj.weight",
                    *(f"self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "out_proj",
                                                        "q_layernorm", "k_layernorm"))),
             pre=(EMBED, Weight("model.embedding_norm.weight")), post=(),
             head=Weight("lm_head.weight", optional=True)),
    _decoder("baichuan", ("BaichuanForCausalLM",),
             TWO_NORMS + _req("self_attn.W_pack.weight", "self_attn.o_proj.weight") + GATED_MLP,
             head=REQUIRED_HEAD),
    _decoder("internlm2", ("InternLM2ForCausalLM",),
             _req("attention_norm.weight", "ffn_norm.weight", "attention.wqkv.weight", "attention.wo.weight",
                  *(f"feed_forward.w{k}.weight" for k in (1, 2, 3))),
             pre=(Weight("model.tok_embeddings.weight"),),
             head=_head("output.weight", tied_to=("model.tok_embeddings.weight",))),
    # Phi
    _decoder("phi3", ("Phi3ForCausalLM",),
             TWO_NORMS + _req("self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
                              "mlp.down_proj.weight"), head=REQUIRED_HEAD),
    _decoder("phi3small", ("Phi3SmallForCausalLM",),
             _wb("input_layernorm", "post_attention_layernorm", "self_attn.query_key_value", "self_attn.dense",
                 "mlp.up_proj", "mlp.down_proj"),
             post=_req("model.final_layernorm.weight", "model.final_layernorm.bias")),
    _decoder("phi", ("PhiForCausalLM",),
             _wb("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense",
                 "mlp.fc1", "mlp.fc2"),
             post=_wb("model.final_layernorm", "lm_head"), head=None),
    Architecture("phi-msft", ("PhiForCausalLM",), (Weight("transformer.embd.wte.weight"),),
                 _in("transformer.h.{i}.", _wb("ln", "mixer.Wqkv", "mixer.out_proj", "mlp.fc1", "mlp.fc2")),
                 _wb("lm_head.ln", "lm_head.linear"), layers_key="n_layer"),
    Architecture("mixformer-sequential", ("MixFormerSequentialForCausalLM",), (Weight("layers.0.wte.weight"),),
                 _in("layers.{i}.", _wb("ln", "mixer.Wqkv", "mixer.out_proj", "mlp.fc1", "mlp.fc2")
                     + _req("mixer.rotary_emb.inv_freq")),
                 _wb("layers.{n}.ln", "layers.{n}.linear"), layers_key="n_layer"),
    # StableLM, StarCoder2
    _decoder("stablelm", ("StableLmForCausalLM",),
             _wb("input_layernorm", "post_attention_layernorm") + QKVO
             + _opt(*(f"self_attn.{p}_proj.bias" for p in "qkv")) + GATED_MLP,
             post=_wb("model.norm"), head=REQUIRED_HEAD),
    _decoder("stablelm_epoch", ("StableLMEpochForCausalLM",),
             _wb("input_layernorm", "post_attention_layernorm") + QKVO + GATED_MLP, head=REQUIRED_HEAD),
    _decoder("starcoder2", ("Starcoder2ForCausalLM",),
             _wb("input_layernorm", "post_attention_layernorm", *(f"self_attn.{p}_proj" for p in "qkvo"),
                 "mlp.c_fc", "mlp.c_proj"), post=_wb("model.norm")),
    # `transformer.` layouts
    _gpt2_like("gpt2", ("GPT2LMHeadModel",), aliases=True),
    _gpt2_like("gpt_bigcode", ("GPTBigCodeForCausalLM",), aliases=False),
    Architecture("jais", ("JAISLMHeadModel",), _req("transformer.wte.weight", "transformer.relative_pe.slopes"),
                 _in("transformer.h.{i}.", _wb("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                               "mlp.c_fc2", "mlp.c_proj")),
                 _wb("transformer.ln_f"), layers_key="n_layer"),
    # Falcon: mergekit's table has the Falcon-40B layout only (ln_attn / ln_mlp, an untied head), where Falcon-7B-style
    # checkpoints (one input_layernorm, or a post_attention_layernorm too; a head tied to the embeddings) fail.
    # Here every layer norm is optional, so either layout merges, and the head may be tied.
    Architecture("falcon", ("FalconForCausalLM",), (Weight("transformer.word_embeddings.weight"),),
                 _in("transformer.h.{i}.", _req("self_attention.query_key_value.weight", "self_attention.dense.weight",
                                                "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight")
                     + _opt(*(f"{m}.{p}" for m in ("ln_attn", "ln_mlp", "input_layernorm", "post_attention_layernorm")
                              for p in ("weight", "bias")))),
                 (*_wb("transformer.ln_f"), _head(tied_to=("transformer.word_embeddings.weight",)))),
    Architecture("exaone", ("ExaoneForCausalLM",), (Weight("transformer.wte.weight"),),
                 _in("transformer.h.{i}.", _req("ln_1.weight", "ln_2.weight",
                                                *(f"attn.attention.{p}_proj.weight" for p in ("q", "k", "v", "out")),
                                                "mlp.c_fc_0.weight", "mlp.c_fc_1.weight", "mlp.c_proj.weight")),
                 (Weight("transformer.ln_f.weight"), REQUIRED_HEAD)),
    Architecture("qwen", ("QWenLMHeadModel",), (Weight("transformer.wte.weight"),),
                 _in("transformer.h.{i}.", _wb("attn.c_attn") + _req("attn.c_proj.weight", "ln_1.weight",
                                                                     "ln_2.weight", "mlp.w1.weight", "mlp.w2.weight",
                                                                     "mlp.c_proj.weight")),
                 (Weight("transformer.ln_f.weight"), REQUIRED_HEAD)),
    Architecture("chatglm", ("ChatGLMModel",),
                 _req("transformer.embedding.word_embeddings.weight", "transformer.rotary_pos_emb.inv_freq"),
                 _in("transformer.encoder.layers.{i}.",
                     TWO_NORMS + _wb("self_attention.query_key_value")
                     + _req("self_attention.dense.weight", "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight")),
                 _req("transformer.encoder.final_layernorm.weight", "transformer.output_layer.weight")),
    # GPT-NeoX: old checkpoints carry three buffers per layer, which mergekit requires; transformers v5 no longer
    # saves them, so here they are optional (merged when present).
    Architecture("gpt_neox", ("GPTNeoXForCausalLM",), (Weight("gpt_neox.embed_in.weight"),),
                 _in("gpt_neox.layers.{i}.",
                     _wb("input_layernorm", "post_attention_layernorm", "attention.query_key_value",
                         "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
                     + _opt("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")),
                 (*_wb("gpt_neox.final_layer_norm"), Weight("embed_out.weight"))),
    Architecture("mamba", ("MambaForCausalLM",), (Weight("backbone.embeddings.weight"),),
                 _in("backbone.layers.{i}.", _req("norm.weight", "mixer.A_log", "mixer.D", "mixer.conv1d.weight",
                                                  "mixer.conv1d.bias", "mixer.in_proj.weight", "mixer.x_proj.weight",
                                                  "mixer.dt_proj.weight", "mixer.dt_proj.bias",
                                                  "mixer.out_proj.weight")),
                 (Weight("backbone.norm_f.weight"), _head(tied_to=("backbone.embeddings.weight",)))),
)

# ---- lookup --------------------------------------------------------------------------------------------

def _by_name() -> dict[str, list[Architecture]]:
    table: dict[str, list[Architecture]] = {}
    for arch in ARCHITECTURES:
        for name in arch.names:
            table.setdefault(name, []).append(arch)
    return table


BY_NAME = _by_name()


def find_architecture(config: dict) -> Architecture | None:
    """The table entry for a config.json: by its `architectures[0]`, disambiguated by `model_type`; None if unknown.

    A config without `architectures` is matched by its `model_type` alone.
    """
    names = config.get("architectures") or []
    model_type = config.get("model_type")
    if not names:
        found = [a for a in ARCHITECTURES if a.model_type == model_type]
        return found[0] if len(found) == 1 else None
    candidates = BY_NAME.get(names[0], [])
    if len(candidates) == 1:
        return candidates[0]
    return next((a for a in candidates if a.model_type == model_type), None)


def known_architectures() -> list[str]:
    """Every `architectures` name in the table, sorted."""
    return sorted(BY_NAME)


def require_architecture(config: dict, where: str) -> Architecture:
    """The table entry for `config`, or a one-line MergeConfigError naming the architecture and the known ones."""
    arch = find_architecture(config)
    if arch is not None:
        return arch
    names = config.get("architectures") or []
    what = names[0] if names else "(no `architectures` in config.json)"
    raise MergeConfigError(
        f"architecture {what} (model_type {config.get('model_type', '?')!r}) is not in mergesearch's table, "
        f"which has the causal LMs mergekit 0.1.5 knows: {', '.join(known_architectures())}", where)


def guess_architecture(names: Iterable[str]) -> Architecture:
    """The table entry whose first layer and surrounding tensors best cover `names` (for callers that only have
    tensor names, e.g. tests; everything that opens a model uses its config.json)."""
    present = set(names)
    config = {"num_hidden_layers": 1, "n_layer": 1, "num_experts": 0}

    def score(arch: Architecture) -> int:
        try:
            wanted = arch.all_weights(config)
        except MergeConfigError:
            return -1
        return sum(w.name in present for w in wanted if not w.optional) - sum(
            w.name not in present for w in wanted if not w.optional)

    return max(ARCHITECTURES, key=score)
