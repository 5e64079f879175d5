"""Fine-tuning: budget schedule, selection and its straight-through gradient, the driver's
quality, checkpoints and resume, NaN handling, data errors, export of a fine-tuned model."""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from disco_compile import Budget, BudgetError, transform
from disco_compile.budget import tasks
from disco_compile.budget.data import batches, image_folder, image_split, loader
from disco_compile.budget.distill import Loss
from disco_compile.errors import CheckpointMismatch, DataError, TrainingDiverged
from disco_compile.budget.finetuning import budget_at, evaluate, exchange_ratio, finetune, update_scores
from disco_compile.budget.selection import magnitude_scores, select

from conftest import assert_close, two_exchange_mlp


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)  # tiny convolutions: a second thread only adds synchronisation
    torch.manual_seed(0)
    task = tasks.digits()
    model = tasks.train_original(tasks.DigitsNet(width=8), task, steps=150)
    return task, model


def _train(task, batch=64, seed=0):
    return loader(task.train, batch, shuffle=True, seed=seed)


def test_budget_schedule_anneals_then_holds():
    values = [budget_at(t, 100, 0.2, 0.5) for t in range(100)]
    assert values[0] == 1.0
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert values[50:] == [0.2] * 50
    assert math.isclose(values[25], 0.6)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("rho", [0.0, 0.1, 0.2, 0.5, 1.0])
def test_selection_stays_within_budget(digits, allocation, rho):
    task, model = digits
    dm = transform(model, 3, task.example)
    select(dm, magnitude_scores(dm), Budget(rho, allocation, align=1, compute_weight=0.0))
    ratio = exchange_ratio(dm)
    assert ratio <= rho + 1e-9
    assert ratio >= rho - 0.1, f"{allocation} at rho={rho} keeps only {ratio:.3f} of the dense bytes"
    for ex in dm.exchanges.values():
        assert not bool((ex.keep & ~ex.remote).any())


def test_straight_through_scores_change_gradients_not_outputs(digits):
    task, model = digits
    dm = transform(model, 2, task.example)
    dm.set_budget(Budget(0.2, allocation="uniform", align=1))
    x = task.train.tensors[0][:16]
    with torch.no_grad():
        before = dm(x)
    scores = magnitude_scores(dm)
    for name, ex in dm.exchanges.items():
        ex.learn_selection(scores[name])
    out = dm(x)
    assert_close(out, before, what="forward with learnable scores")
    out.square().sum().backward()
    for name, ex in dm.exchanges.items():
        dropped = ex.remote & ~ex.keep
        assert dropped.any()
        assert bool((ex.score.grad[dropped] != 0).any()), f"{name}: no gradient reaches unsent candidates"
        assert bool((ex.score.grad[~ex.remote] == 0).all())


def test_learned_scores_are_the_running_mean_of_the_negative_gradient():
    s = nn.Parameter(torch.tensor([5.0, -1.0]))
    s.grad = torch.tensor([2.0, 0.5])
    update_scores([s], 0.9, 1)  # the first gradient replaces the starting scores
    assert torch.equal(s.detach(), torch.tensor([-2.0, -0.5])) and s.grad is None
    s.grad = torch.tensor([-4.0, 0.5])
    update_scores([s], 0.9, 2)  # bias-corrected mean of -g: (0.9 * 0.1 * g1 + 0.1 * g2) / (1 - 0.81), negated
    assert_close(s.detach(), -(0.09 * torch.tensor([2.0, 0.5]) + 0.1 * torch.tensor([-4.0, 0.5])) / 0.19,
                 what="second update")


def test_learned_scores_follow_the_loss_not_the_weights():
    """Features 0 and 4 are always zero but have the heaviest weight columns: magnitude sends them, the learned
    scores send the features the output depends on most (1 and 5), weights frozen (lr=0). A dense output (MSE):
    each output row's error is its own, so no other node's choice can offset a feature's loss gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2, bias=False), nn.Unflatten(1, (2, 1))).eval()
    with torch.no_grad():
        model[0].bias.fill_(1.0)
        model[0].weight[[0, 4]] = 0.0
        model[0].bias[[0, 4]] = -1.0
        model[2].weight.copy_(torch.tensor([10.0, 1.0, 0.1, 0.1]).repeat(2).expand(2, 8))
    x = torch.randn(64, 4)
    kept = {}
    for method in ("magnitude", "learned"):
        dm = transform(model, 2, x)
        ex = dm.exchanges["_1"]
        assert ex.owner.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # each node's half holds one dead, one useful feature
        finetune(dm, list(x.split(16)), budget=Budget(0.25, allocation="uniform", align=1), steps=8, method=method,
                 lr=0.0, progress=False)
        kept[method] = [ex.keep[j].nonzero().flatten().tolist() for j in range(2)]
    assert kept == {"magnitude": [[4], [0]], "learned": [[5], [1]]}


def test_finetune_recovers_quality_and_reports(digits):
    task, model = digits
    val = loader(task.val, 300, shuffle=False, seed=0)
    original = evaluate(model, val)[1]
    dm = transform(model, 2, task.example)
    dm.set_budget(Budget(0.2, allocation="uniform", align=1))
    one_shot = evaluate(dm, val)[1]
    dm = transform(model, 2, task.example)
    res = finetune(dm, _train(task), budget=Budget(0.2, align=1, compute_weight=0.0), steps=120, val_data=val,
                   progress=False)
    assert res.exchange_ratio <= 0.2 + 1e-9
    assert res.validation["metric"] == "accuracy %"
    assert res.validation["teacher"] == pytest.approx(original)
    assert res.validation["student"] > one_shot, (res.validation, one_shot)
    assert res.validation["student"] >= original - 8.0
    assert not dm.training and all(ex.score is None for ex in dm.exchanges.values())
    assert res.history[-1]["budget"] == pytest.approx(0.2) and res.history[0]["budget"] > 0.2
    assert res.batchnorm_batches == 20


def test_unlabelled_data_and_agreement_metric(digits):
    task, model = digits
    unlabelled = [x for x, _ in _train(task)]
    dm = transform(model, 2, task.example)
    res = finetune(dm, unlabelled, budget=0.5, steps=20, val_data=[x for x, _ in loader(task.val, 300, False, 0)],
                   progress=False)
    assert res.validation["metric"] == "agreement with the teacher %"
    assert 0 <= res.validation["student"] <= 100


def test_unlabelled_dense_outputs_validate_against_the_teacher():
    """Unlabelled validation of an image-to-image model: PSNR against the teacher's outputs, no teacher figure
    (it would be measured against itself), and one pass over the data (a generator works)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)).eval()
    x = torch.rand(4, 3, 8, 8)
    dm = transform(model, 2, x)
    res = finetune(dm, [x], budget=Budget(0.5, align=1, compute_weight=0.0), steps=2, val_data=(b for b in [x, x]),
                   progress=False)
    assert res.validation["metric"] == "PSNR dB against the teacher" and "teacher" not in res.validation
    assert res.validation["student"] > 10


def test_nested_outputs_distil_leaf_by_leaf():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            f = self.body(x)
            return {"out": f, "aux": (self.head(f.mean((2, 3))),)}

    torch.manual_seed(0)
    model = TwoHeads().eval()
    data = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    dm = transform(model, 2, data[0][:1])
    teacher = copy.deepcopy(model)
    loss = Loss()
    dm.set_budget(0.0)
    with torch.no_grad():
        before = loss.distill(dm(data[0]), teacher(data[0])).item()
    res = finetune(dm, data, budget=Budget(0.0, align=1, compute_weight=0.0), steps=30, teacher=teacher, lr=3e-3,
                   progress=False)
    with torch.no_grad():
        after = loss.distill(dm(data[0]), teacher(data[0])).item()
    assert res.exchange_ratio == 0.0
    assert after < before


def test_resume_continues_exactly(digits, tmp_path):
    task, model = digits
    data = list(_train(task))[:6]

    class Interrupted:
        def __init__(self, after):
            self.after, self.given = after, 0

        def __iter__(self):
            for b in data:
                if self.given == self.after:
                    raise KeyboardInterrupt
                self.given += 1
                yield b

    budget = Budget(0.2, align=1, compute_weight=0.0)
    kwargs = dict(budget=budget, steps=16, checkpoint_every=5, progress=False, batchnorm_batches=3)
    whole = transform(model, 2, task.example)
    finetune(whole, data, **kwargs)
    resumed = transform(model, 2, task.example)
    with pytest.raises(KeyboardInterrupt):
        finetune(resumed, Interrupted(12), checkpoint_dir=tmp_path, **kwargs)
    assert torch.load(tmp_path / "last.pt", weights_only=False)["step"] == 10
    resumed = transform(model, 2, task.example)
    res = finetune(resumed, data, checkpoint_dir=tmp_path, resume=True, **kwargs)
    assert res.steps == 16 and res.history[-1]["step"] == 16
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=False):
        assert torch.equal(a, b), f"{name} differs after resume"

    for change, text in (({"budget": replace(budget, compute_weight=0.1)}, "compute_weight: checkpoint 0.0 vs now 0.1"),
                         ({"budget": replace(budget, rho=0.3)}, "budget: checkpoint 0.2 vs now 0.3"),
                         ({"budget": replace(budget, allocation="uniform")},
                          "allocation: checkpoint 'global' vs now 'uniform'"),
                         ({"score_decay": 0.5}, "score_decay: checkpoint 0.9 vs now 0.5")):
        with pytest.raises(CheckpointMismatch, match=text):
            finetune(transform(model, 2, task.example), data, checkpoint_dir=tmp_path, resume=True,
                     **(kwargs | change))
    other = transform(model, 3, task.example)
    with pytest.raises(CheckpointMismatch, match="nodes: checkpoint 2 vs now 3"):
        finetune(other, data, checkpoint_dir=tmp_path, resume=True, **kwargs)
    with pytest.raises(CheckpointMismatch, match="does not exist"):
        finetune(other, data, checkpoint_dir=tmp_path / "none", resume=True, **kwargs)


def test_nan_loss_stops_and_keeps_last_good_state(digits, tmp_path):
    task, model = digits
    data = list(_train(task))[:8]
    poisoned = data[:7] + [(torch.full_like(data[7][0], float("nan")), data[7][1])]
    dm = transform(model, 2, task.example)
    with pytest.raises(TrainingDiverged, match=r"became nan at step 8.*last good state \(step 5\).*last.pt"):
        finetune(dm, poisoned, budget=0.5, steps=20, checkpoint_every=5, checkpoint_dir=tmp_path, progress=False)
    saved = torch.load(tmp_path / "last.pt", weights_only=False)
    assert saved["step"] == 5
    for name, t in dm.state_dict().items():
        assert torch.equal(t, saved["model"][name]), name


def test_finetune_selects_with_the_compute_weight():
    """Fixed magnitude scores: after fine-tuning, the channels kept are set_budget's at the same compute weight
    (which differ from bytes alone: test_cost), and a weight with the uniform allocation is refused."""
    model = two_exchange_mlp()
    data = [torch.randn(8, 4) for _ in range(2)]
    chosen = {}
    for weight in (0.0, 10.0):
        ref = transform(model, 2, data[0])
        ref.set_budget(Budget(0.25, "global", align=1, compute_weight=weight))
        chosen[weight] = {name: ex.keep.clone() for name, ex in ref.exchanges.items()}
    assert any(not torch.equal(chosen[0.0][n], chosen[10.0][n]) for n in chosen[0.0])
    dm = transform(model, 2, data[0])
    finetune(dm, data, budget=Budget(0.25, align=1, compute_weight=10.0), steps=2, method="magnitude", progress=False)
    assert all(torch.equal(ex.keep, chosen[10.0][name]) for name, ex in dm.exchanges.items())
    with pytest.raises(BudgetError, match="allocation='global'"):
        finetune(transform(model, 2, data[0]), data, budget=Budget(0.2, allocation="uniform", compute_weight=1.0),
                 steps=1, progress=False)


@pytest.mark.parametrize("budget", [-0.1, 1.5, float("nan")])
def test_budget_outside_unit_interval(digits, budget):
    task, model = digits
    with pytest.raises(BudgetError, match=r"must be in \[0, 1\]"):
        finetune(transform(model, 2, task.example), [task.example], budget=budget, steps=1, progress=False)


@pytest.mark.parametrize("decay", [-0.1, 1.0, float("nan")])
def test_score_decay_outside_its_range(digits, decay):
    task, model = digits
    with pytest.raises(ValueError, match=r"score_decay must be in \[0, 1\)"):
        finetune(transform(model, 2, task.example), [task.example], budget=0.2, steps=1, score_decay=decay,
                 progress=False)


def test_bad_data(digits, tmp_path):
    task, model = digits
    dm = transform(model, 2, task.example)
    with pytest.raises(DataError, match="gave no batches"):
        finetune(dm, [], budget=0.5, steps=2, progress=False)
    with pytest.raises(DataError, match="ran out after 1 batches"):
        finetune(dm, iter([task.example]), budget=0.5, steps=2, progress=False)
    with pytest.raises(DataError, match="a batch must be"):
        next(batches([{"x": task.example}]))
    with pytest.raises(DataError, match="does not exist"):
        image_folder(tmp_path / "missing", (8, 8), train=True)
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        image_folder(tmp_path / "empty", (8, 8), train=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        image_folder(bad, (8, 8), train=False)[0]
    with pytest.raises(DataError, match="too few"):
        image_split(bad, (8, 8), 0.5, seed=0)


def test_finetuned_model_exports_with_the_same_quality(digits, tmp_path):
    from disco_compile.backend.exporter import export
    from disco_compile.budget.finetuning import evaluate_bundle
    task, model = digits
    dm = transform(model, 2, task.example)
    finetune(dm, _train(task), budget=0.2, steps=20, progress=False)
    test = [task.test.tensors]
    torch_metric = evaluate(dm, test)[1]
    export(dm, tmp_path / "shards")
    name, onnx_metric = evaluate_bundle(tmp_path / "shards", test)
    assert name == "accuracy %"
    assert abs(onnx_metric - torch_metric) <= 0.01


def test_two_processes_with_torchrun_match_one_with_both_batches(tmp_path):
    """DDP (gloo, 2 processes): process r takes batches r, r+2, ...; gradients are averaged, which
    for equal halves equals one process training on the two batches joined."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path
    helpers = Path(__file__).parent / "helpers"
    out = tmp_path / "ddp.pt"
    with socket.socket() as s:  # a free port, so parallel runs of this test do not meet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]  # this checkout's disco_compile, whatever the venv points to
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(helpers), str(root)])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port),
                           str(helpers / "ddp_finetune.py"), str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sys.path.insert(0, str(helpers))
    try:
        import ddp_finetune
    finally:
        sys.path.remove(str(helpers))
    model, batches = ddp_finetune.setup()
    joined = [torch.cat(batches[k:k + 2]) for k in range(0, len(batches), 2)]
    single = ddp_finetune.run(model, joined).state_dict()
    ddp = torch.load(out, weights_only=True)
    for name, t in single.items():
        assert_close(ddp[name].float(), t.float(), rtol=1e-4, atol=1e-6, what=name)
