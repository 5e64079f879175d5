"""Attention in every form it is written (passes/raise_attention.py): tiny hand-built modules for each form
(F.scaled_dot_product_attention with fused qkv and unbind, q and k normalised per head (qk-norm by LayerNorm and
RMSNorm, Swin V2's cosine attention), XCA's attention over channels, rotary embeddings (EVA's, past a class token),
the matmul form with a scale, separate q/k/v Linears, an additive and a bool mask, is_causal, GPT-2's projection of
tokens folded into dim 0 with a bool causal mask, a per-head relative position bias, window attention with windows
in the batch dim, interleaved per-head q/k/v of another value width, CoAtNet's channels-first attention from a 1x1
conv back to one), then timm's ViT and DeiT and Hugging Face's BERT, GPT-2 and ViT from small configs. Each: exact
at N=2 and 3 with nothing replicated and every head on one node, and its ONNX shards equal to the DISCO model at rho
1 and 0.5."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_close, assert_shards_match, assert_split_exact
from disco_compile import transform
from disco_compile.ops.attention import head_covariance, head_scores, heads_apply, heads_attention, heads_mix
from disco_compile.passes.raise_attention import raise_attention

CORES = (heads_attention, head_scores, heads_apply, head_covariance, heads_mix)


class Attention(nn.Module):
    """Self-attention over (B, N, C) tokens, written in one of several forms; C = heads * 4."""

    def __init__(self, form: str, channels: int = 12, heads: int = 3, tokens: int = 6):
        super().__init__()
        self.form, self.heads, self.width = form, heads, channels // heads
        if form in ("separate", "mask", "bool_mask"):
            self.q, self.k, self.v = (nn.Linear(channels, channels) for _ in range(3))
        else:
            self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.register_buffer("mask", torch.randn(1, 1, tokens, tokens))
        self.register_buffer("keep", (torch.rand(1, 1, tokens, tokens) > 0.3) | torch.eye(tokens, dtype=torch.bool))
        self.table = nn.Parameter(torch.randn(2 * tokens - 1, heads))
        self.q_norm, self.k_norm = nn.LayerNorm(self.width), nn.RMSNorm(self.width)
        self.logit_scale = nn.Parameter(torch.randn(heads, 1, 1))
        angles = torch.randn(tokens - 1, self.width // 2)
        self.register_buffer("cos", angles.cos().repeat(1, 2))  # the rotary tables of the tokens after the first
        self.register_buffer("sin", angles.sin().repeat(1, 2))
        position = torch.arange(tokens)
        self.register_buffer("index", position[:, None] - position[None, :] + tokens - 1)

    def bias(self) -> torch.Tensor:  # (1, H, N, N), from parameters alone
        return self.table[self.index].permute(2, 0, 1).unsqueeze(0)

    def split(self, x: torch.Tensor):
        b, n, c = x.shape
        if self.form == "flat":  # GPT-2's Conv1D projects x.view(-1, C): its output is (b * n, 3C)
            qkv = self.qkv(x.reshape(b * n, c)).view(b, n, 3 * c)
            parts = qkv.split(c, dim=2)
            return (parts[i].view(b, n, self.heads, self.width).transpose(1, 2) for i in range(3))
        if self.form in ("separate", "mask", "bool_mask"):
            return (f(x).view(b, n, self.heads, self.width).transpose(1, 2) for f in (self.q, self.k, self.v))
        return self.qkv(x).reshape(b, n, 3, self.heads, self.width).permute(2, 0, 3, 1, 4).unbind(0)

    def cross_covariance(self, x: torch.Tensor) -> torch.Tensor:
        """XCA (EdgeNeXt, XCiT): q, k, v (B, H, d, N), q and k normalised over the tokens, a (d, d) map."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.width).permute(2, 0, 3, 4, 1).unbind(0)
        scores = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.logit_scale
        return self.proj((scores.softmax(dim=-1) @ v).permute(0, 3, 1, 2).reshape(b, n, c))

    def rotary(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """EVA's rotary embedding (timm.layers.pos_embed_sincos): the first token (a class token) kept, the
        others rotated, halves (rotate_half) or interleaved pairs (rot), then cast like v."""
        if self.form == "rotary":
            half = t[:, :, 1:].chunk(2, dim=-1)
            turned = torch.cat([-half[1], half[0]], dim=-1)
        else:
            turned = torch.stack([-t[:, :, 1:, 1::2], t[:, :, 1:, ::2]], -1).reshape(t[:, :, 1:].shape)
        return torch.cat([t[:, :, :1], t[:, :, 1:] * self.cos + turned * self.sin], dim=2).type_as(like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "xca":
            return self.cross_covariance(x)
        b, n, c = x.shape
        q, k, v = self.split(x)
        if self.form == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        elif self.form in ("bool_mask", "flat"):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.keep)
        elif self.form == "causal":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.form == "sdpa_bias":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias(), scale=0.3)
        elif self.form in ("rotary", "rotary_pairs"):
            o = F.scaled_dot_product_attention(self.rotary(q, v), self.rotary(k, v), v)
        elif self.form == "qk_norm":  # timm's qk_norm=True
            o = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        elif self.form == "cosine":  # Swin V2: cosine similarity of q and k, a learned scale per head
            scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
            o = (scores * scale + self.bias()).softmax(dim=-1) @ v
        else:
            scores = (q * self.width ** -0.5) @ k.transpose(-2, -1) if self.form == "matmul" else \
                torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.width)
            if self.form == "mask":
                scores = scores + self.mask
            if self.form == "bias":
                scores = scores + self.bias()
            o = scores.softmax(dim=-1) @ v
        return self.proj(o.transpose(1, 2).contiguous().reshape(b, n, c))


class Windowed(nn.Module):
    """timm Swin's window attention: (B, 4, 4, C) maps cut into 2x2 windows folded into the batch dim, a
    per-head relative position bias and a per-window mask added to the scores through a view."""

    def __init__(self, channels: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(channels, 3 * channels), nn.Linear(channels, channels)
        self.table = nn.Parameter(torch.randn(9, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(2), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + 1
        self.register_buffer("index", rel[..., 0] * 3 + rel[..., 1])
        self.register_buffer("window_mask", torch.randn(4, 4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        windows = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, c)
        bw, n, _ = windows.shape
        q, k, v = self.qkv(windows).reshape(bw, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * 0.5) @ k.transpose(-2, -1)
        attn = attn + self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        attn = attn.view(-1, 4, self.heads, n, n) + self.window_mask.unsqueeze(1).unsqueeze(0)
        o = (attn.view(-1, self.heads, n, n).softmax(-1) @ v).transpose(1, 2).reshape(bw, n, -1)
        y = self.proj(o).view(b, h // 2, w // 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        return y.mean((1, 2))


class Interleaved(nn.Module):
    """LeViT's layout: q, k of 4 and v of 6 channels per head, interleaved per head in one Linear's output,
    split along the last dim, and a per-head bias."""

    def __init__(self, channels: int = 10, heads: int = 2, tokens: int = 5):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(channels, heads * (4 + 4 + 6))
        self.proj = nn.Linear(heads * 6, channels)
        self.attention_biases = nn.Parameter(torch.randn(heads, tokens, tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, -1).split([4, 4, 6], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
        attn = (q @ k * 0.5 + self.attention_biases).softmax(dim=-1)
        return self.proj(F.gelu((attn @ v).transpose(1, 2).reshape(b, n, -1)))


class ChannelsFirst(nn.Module):
    """CoAtNet's Attention2d on (B, C, H, W): q, k, v from a 1x1 conv viewed (B, heads, d, HW), attention over
    the positions (fused, or the matmul form with a per-head bias), back to (B, C, H, W) for a 1x1 conv."""

    def __init__(self, fused: bool, channels: int = 12, heads: int = 3, side: int = 3):
        super().__init__()
        self.fused, self.heads, self.width = fused, heads, channels // heads
        self.embed = nn.Conv2d(3, channels, 3, padding=1)
        self.qkv, self.proj = nn.Conv2d(channels, 3 * channels, 1), nn.Conv2d(channels, 4, 1)
        self.bias = nn.Parameter(torch.randn(heads, side * side, side * side))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, c, height, width = h.shape
        q, k, v = self.qkv(h).reshape(b, 3, self.heads, self.width, -1).unbind(1)
        if self.fused:
            o = F.scaled_dot_product_attention(q.transpose(-1, -2).contiguous(), k.transpose(-1, -2).contiguous(),
                                               v.transpose(-1, -2).contiguous(), attn_mask=self.bias)
            o = o.transpose(-1, -2).reshape(b, -1, height, width)
        else:
            attn = ((q * self.width ** -0.5).transpose(-2, -1) @ k + self.bias).softmax(dim=-1)
            o = (v @ attn.transpose(-2, -1)).view(b, -1, height, width)
        return self.proj(F.gelu(h + o))


class Embedded(nn.Module):
    """An input Linear, the attention with a residual, a LayerNorm and a classifier over the mean token."""

    def __init__(self, attention: nn.Module, channels: int):
        super().__init__()
        self.embed, self.attn = nn.Linear(5, channels), attention
        self.norm, self.head = nn.LayerNorm(channels), nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(self.norm(h + self.attn(h)).mean(1))


FORMS = ["sdpa", "bool_mask", "causal", "flat", "sdpa_bias", "qk_norm", "cosine", "xca", "rotary", "rotary_pairs",
         "matmul", "separate", "mask", "bias"]


def hand_built(form: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if form == "window":
        model, x = nn.Sequential(nn.Linear(3, 8), Windowed()), torch.randn(2, 4, 4, 3)
    elif form == "interleaved":
        model, x = Embedded(Interleaved(), 10), torch.randn(2, 5, 5)
    elif form.startswith("channels_first"):
        model, x = ChannelsFirst(fused=form.endswith("fused")), torch.randn(2, 3, 3, 3)
    else:
        model, x = Embedded(Attention(form), 12), torch.randn(2, 6, 5)
    return model.eval(), x


def heads_on_one_node(dm) -> int:
    """Every per-head core's heads lie whole on one node; returns how many cores there are."""
    cores = [n for n in dm.graph_module.graph.nodes if n.target in CORES]
    for core in cores:
        heads = core.args[2] if core.target is not heads_attention else core.args[3]
        for arg in core.args[:3 if core.target is heads_attention else 2]:
            placement = arg.meta["disco"]
            if placement.labels is None or placement.labels.shape[-1] == 1:  # whole, or scores (heads in dim 1)
                continue
            owners = placement.owner.reshape(heads, -1)
            assert (owners == owners[:, :1]).all(), f"{core.name}: a head of '{arg.name}' straddles nodes"
    return len(cores)


def check(model: nn.Module, x, tmp_path, nodes: int, rho: float | None) -> None:
    dm = assert_split_exact(model, nodes, x)
    assert dm.cost().replicated_ops == []
    assert heads_on_one_node(dm) > 0
    if rho is not None:
        assert_shards_match(dm, x, tmp_path / "out", rho)


# ONNX at rho 1 for N=2 and at rho 0.5 for N=3 (the export of each is some seconds)
RUNS = [(2, 1.0), (3, 0.5)]


@pytest.mark.parametrize("nodes, rho", RUNS)
@pytest.mark.parametrize("form", [*FORMS, "window", "interleaved", "channels_first_fused", "channels_first"])
def test_hand_built_form(form, nodes, rho, tmp_path):
    check(*hand_built(form), tmp_path, nodes, rho)


@pytest.mark.parametrize("form", ["flat", "window"])
def test_a_split_traced_at_batch_1_runs_a_batch_of_2(form, tmp_path):
    """Rows folded with the batch (GPT-2's (batch * tokens, C) projection, windows in dim 0) are reshaped with -1
    there, not the example's count: the DISCO model and its shards, made from a batch of one, compute a batch
    of two."""
    model, x = hand_built(form)
    dm = transform(model, 2, x[:1])
    with torch.no_grad():
        assert_close(dm(x), model(x), what=f"{form}: DISCO model at batch 2")
    assert_shards_match(dm, x, tmp_path / "out", 0.5)


def test_a_form_that_does_not_fit_declines():
    """A q mixed across its heads (each head plus the mean of all) is neither data movement nor per head: the
    matmuls stay as written (replicated, named), the pass does not abort, and the model's output is kept."""

    class Normed(Attention):
        def split(self, x):
            q, k, v = super().split(x)
            return q + q.mean(1, keepdim=True), k, v

    torch.manual_seed(0)
    model, x = Embedded(Normed("matmul"), 12).eval(), torch.randn(2, 6, 5)
    dm = assert_split_exact(model, 2, x)
    assert {r.target for r in dm.cost().replicated_ops} == {"matmul", "Tensor.permute"}


def test_the_pass_computes_what_the_graph_computed():
    """raise_attention on a traced graph: one core per matmul and attention call, same output."""
    model, x = hand_built("bias")
    gm = torch.fx.symbolic_trace(model)
    assert raise_attention(gm, (x,)) == 2
    assert sum(n.target in CORES for n in gm.graph.nodes) == 2
    with torch.no_grad():
        assert_close(gm(x), model(x), what="raised graph")


class Wrapped(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_timm(name, fused, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=24,
                              num_heads=3, num_classes=10).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    x = torch.randn(2, 3, 32, 32)
    for nodes, rho in RUNS:
        check(Wrapped(model), x, tmp_path / str(nodes), nodes, rho)


@pytest.mark.parametrize("fused", [True, False])
def test_timm_program(fused, tmp_path):
    """timm's ViT as a torch.export program: qkv.unbind(0) (aten.unbind, which crashed the pass) and the
    matmul form (aten.matmul) split by heads too."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=24, num_heads=3, num_classes=10).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    x = torch.randn(1, 3, 32, 32)
    _program_splits_by_heads(model, x, tmp_path, "timm program")


def _program_splits_by_heads(model: nn.Module, x: torch.Tensor, tmp_path, what: str) -> None:
    """model's torch.export program at each of RUNS: exact, nothing replicated, heads whole, shards equal."""
    program = torch.export.export(model, (x,))
    for nodes, rho in RUNS:
        dm = transform(program, nodes, x)
        with torch.no_grad():
            assert_close(dm(x), model(x), what=f"{what} N={nodes}")
        assert dm.cost().replicated_ops == []
        assert heads_on_one_node(dm) > 0
        assert_shards_match(dm, x, tmp_path / str(nodes), rho)


def hf_model(kind: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=32)
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(vocab_size=50, max_position_embeddings=16, **small))
        x = torch.randint(0, 50, (1, 7))
    elif kind == "gpt2":  # Conv1D projections of x.view(-1, C) and a bool causal mask
        model = transformers.GPT2Model(transformers.GPT2Config(vocab_size=50, n_embd=24, n_layer=2, n_head=3,
                                                               n_positions=16, use_cache=False))
        x = torch.randint(0, 50, (1, 7))
    else:
        model = transformers.ViTModel(transformers.ViTConfig(image_size=16, patch_size=8, **small))
        x = torch.randn(1, 3, 16, 16)
    return model.eval(), x


class LastHidden(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).last_hidden_state


@pytest.mark.parametrize("kind", ["bert", "gpt2", "vit"])
def test_hugging_face_through_torch_export(kind, tmp_path):
    """torch.fx cannot trace HF models; their torch.export program splits by heads. Batch 1: the programs
    keep the example's batch in their views (a static batch), which the ONNX shards then have too."""
    model, x = hf_model(kind)
    _program_splits_by_heads(LastHidden(model).eval(), x, tmp_path, kind)
