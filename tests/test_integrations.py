"""trainlab.health.Watch in one's own loop, and the Lightning / Hugging Face callbacks on real tiny
fits (CPU, models built from code or a config, no downloaded weights)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from trainlab.health import Watch, WatchError

LN2 = math.log(2)


def noisy(level: float, n: int, seed: int = 0, slope: float = 0.0) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, generator=gen) * 0.01
    return [level * math.exp(slope * i) + float(e) for i, e in enumerate(noise)]


def test_watch_floats_stuck_stops_and_reports(tmp_path):
    watch = Watch(baseline=LN2, policies={"stuck": "stop"}, run_dir=tmp_path / "h", total_steps=100, every=1)
    fired_at = None
    for step, loss in enumerate(noisy(LN2, 60)):
        alerts = watch.log(step, loss=loss)
        if watch.should_stop:
            fired_at = step
            break
    assert fired_at is not None and [a["detector"] for a in alerts] == ["stuck"]
    assert alerts[0]["policy"] == "stop" and "stuck" in watch.stop_reason
    events = [json.loads(line) for line in (tmp_path / "h" / "events.jsonl").read_text().splitlines()]
    assert [e["detector"] for e in events] == ["stuck"] and events[0]["step"] == fired_at
    verdicts = {c.name: c.verdict for c in watch.report()}
    assert verdicts["stuck"] == "fail"
    saved = json.loads((tmp_path / "h" / "check.json").read_text())
    assert {c["name"]: c["verdict"] for c in saved["claims"]}["stuck"] == "fail"
    assert "stuck" in (tmp_path / "h" / "report.html").read_text()


def test_watch_healthy_loss_passes(tmp_path):
    watch = Watch(baseline=LN2, policies={"stuck": "stop", "divergence": "stop"}, run_dir=tmp_path, total_steps=80)
    for step, loss in enumerate(noisy(LN2, 80, slope=-0.03)):
        watch.log(step, loss=loss)
    verdicts = {c.name: c.verdict for c in watch.report()}
    assert not watch.should_stop and watch.alerts == []
    assert verdicts["stuck"] == "pass" and verdicts["divergence"] == "pass"
    assert not (tmp_path / "events.jsonl").exists()  # written only when an alert fires


class CountingTensor(torch.Tensor):
    """Records each torch function called on it: a read of the value (.item(), .tolist(),
    float()) is a host-device sync on an accelerator."""

    calls: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


READS = {"item", "tolist", "__float__", "__int__", "__bool__", "numpy", "__format__", "__repr__"}


def test_watch_tensors_read_only_when_judged(tmp_path):
    watch = Watch(baseline=LN2, run_dir=tmp_path, every=10)
    CountingTensor.calls = []
    losses = noisy(LN2, 20, slope=-0.02)
    for step in range(9):
        assert watch.log(step, loss=torch.tensor(losses[step]).as_subclass(CountingTensor)) == []
    assert not READS & set(CountingTensor.calls), CountingTensor.calls  # nine steps, no read
    assert watch.rows == []  # nothing judged yet
    watch.log(9, loss=torch.tensor(losses[9]).as_subclass(CountingTensor))
    assert [c for c in CountingTensor.calls if c in READS] == ["tolist"]  # one read for ten rows
    assert [r["loss"] for r in watch.rows] == pytest.approx(losses[:10])
    # a value updated in place after log() (a running sum) does not change what was logged
    running = torch.tensor(1.0)
    watch.log(10, loss=running)
    running += 5
    watch.flush()
    assert watch.rows[-1]["loss"] == 1.0


@pytest.mark.parametrize("kwargs, words", [
    ({"policies": {"divergnce": "stop"}}, ["unknown detector 'divergnce'", "divergence", "stuck", "overfitting"]),
    ({"policies": {"divergence": "rollback"}}, ["divergence='rollback' not allowed", "off, warn, stop"]),
    ({"policies": {"grokking": "stop"}}, ["grokking='stop' not allowed", "off, warn"]),
    ({"divergence": "halt"}, ["divergence='halt' not allowed"]),
    ({"windw": 30}, ["unknown key", "did you mean 'window'"]),
    ({"window": 2}, ["health.window"]),
    ({"baseline": "bcee"}, ["baseline=bcee", "bce (ln 2) or ce:V"]),
    ({"baseline": -1.0}, ["baseline=-1.0", "a positive number"]),
    ({"every": 0}, ["every: expected a whole number >= 1"]),
])
def test_watch_bad_arguments_one_line_nothing_written(tmp_path, kwargs, words):
    with pytest.raises(WatchError) as info:
        Watch(run_dir=tmp_path / "h", **kwargs)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "h").exists()


def test_watch_without_baseline_says_not_measured(tmp_path):
    watch = Watch(baseline=None, run_dir=tmp_path)
    for step, loss in enumerate(noisy(LN2, 40)):
        watch.log(step, loss=loss)
    claims = {c.name: c for c in watch.report()}
    assert claims["stuck"].verdict == "not measured" and "baseline" in claims["stuck"].value


# ---------------------------------------------------------------- Lightning

def _lightning_fit(tmp_path, lr: float, policies: dict, max_steps: int = 80):
    pl = pytest.importorskip("lightning.pytorch", reason="Lightning not installed (pip install trainlab[lightning])")
    from trainlab.integrations.lightning import HealthCallback

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
            # a zero output layer starts at the random guess exactly (logits 0: loss ln 2), so lr=0 stays there
            torch.nn.init.zeros_(self.net[2].weight)
            torch.nn.init.zeros_(self.net[2].bias)
            self.step_losses: list[float] = []

        def _step(self, batch, prefix):
            x, y = batch
            logits = self.net(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            if prefix == "train":
                self.step_losses.append(float(loss))  # the test's own record, to compare the rows with
            self.log(f"{prefix}_loss", loss)
            self.log(f"{prefix}_acc", (logits.argmax(1) == y).float().mean())
            return loss

        def training_step(self, batch, batch_idx):
            return self._step(batch, "train")

        def validation_step(self, batch, batch_idx):
            self._step(batch, "val")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    torch.manual_seed(0)
    x = torch.randn(512, 4)
    y = (x[:, 0] + x[:, 1] > 0).long()
    data = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:128], y[:128]), batch_size=64)
    # a row every 2 steps, the mean of their losses, as trainlab's own rows are
    callback = HealthCallback(baseline=LN2, policies=policies, run_dir=tmp_path / "health", every_n_steps=2)
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1, accelerator="cpu", devices=1,
                         num_sanity_val_steps=0, val_check_interval=20, check_val_every_n_epoch=None,
                         callbacks=[callback], default_root_dir=tmp_path)
    module = Tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on num_workers and the like
        trainer.fit(module, train, val)
    return trainer, callback, module.step_losses


def test_lightning_healthy_fit_passes(tmp_path):
    trainer, callback, step_losses = _lightning_fit(tmp_path, lr=0.2, policies={"stuck": "stop", "divergence": "stop"})
    verdicts = {c.name: c.verdict for c in callback.claims}
    assert trainer.global_step == 80 and not callback.watch.should_stop, callback.watch.alerts
    assert verdicts["stuck"] == "pass" and verdicts["divergence"] == "pass", verdicts
    rows = callback.watch.rows
    assert [r["step"] for r in rows] == list(range(2, 81, 2)) and rows[-1]["loss"] < 0.5 * LN2
    assert [r["step"] for r in rows if "val_loss" in r] == [22, 42, 62, 80]  # each joined the next row
    assert "acc" in rows[0] and rows[0]["lr"] == 0.2
    # each row holds the mean of its two steps' losses, not the last batch's
    assert [r["loss"] for r in rows] == pytest.approx([sum(step_losses[i:i + 2]) / 2 for i in range(0, 80, 2)])
    assert (tmp_path / "health" / "check.json").is_file()


def test_lightning_stuck_fit_is_stopped(tmp_path):
    trainer, callback, _ = _lightning_fit(tmp_path, lr=0.0, policies={"stuck": "stop"}, max_steps=200)
    verdicts = {c.name: c.verdict for c in callback.claims}
    assert callback.watch.should_stop and verdicts["stuck"] == "fail", verdicts
    fired = callback.watch.alerts[0]
    assert fired["detector"] == "stuck" and trainer.global_step == fired["step"] < 200


# ---------------------------------------------------------------- Hugging Face transformers

class TokenData(torch.utils.data.Dataset):
    """Sequences of 8 tokens whose label is whether the first token is 3 (else 4)."""

    def __init__(self, n: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, 16, (n, 8), generator=gen)
        self.labels = torch.randint(0, 2, (n,), generator=gen)
        self.ids[:, 0] = torch.where(self.labels == 1, 3, 4)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def _hf_train(tmp_path, lr: float, policies: dict, max_steps: int = 60):
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install trainlab[transformers])")
    from trainlab.integrations.transformers import HealthCallback

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=8, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=32, learning_rate=lr,
        logging_steps=2, eval_strategy="steps", eval_steps=20, per_device_eval_batch_size=64, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    callback = HealthCallback(baseline=LN2, policies=policies, run_dir=tmp_path / "health")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(512), eval_dataset=TokenData(128, 1),
                                   callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer, callback


def test_transformers_healthy_training_passes(tmp_path):
    trainer, callback = _hf_train(tmp_path, lr=3e-3, policies={"stuck": "stop", "divergence": "stop"})
    verdicts = {c.name: c.verdict for c in callback.claims}
    assert trainer.state.global_step == 60 and not callback.watch.should_stop
    assert verdicts["stuck"] == "pass" and verdicts["divergence"] == "pass", verdicts
    rows = callback.watch.rows
    assert [r["step"] for r in rows] == list(range(2, 61, 2)) and rows[-1]["loss"] < 0.5 * LN2
    assert sum("val_loss" in r for r in rows) == 3 and "grad_norm" in rows[0] and "lr" in rows[0]
    assert (tmp_path / "health" / "check.json").is_file()


def test_transformers_stuck_training_is_stopped(tmp_path):
    trainer, callback = _hf_train(tmp_path, lr=0.0, policies={"stuck": "stop"}, max_steps=200)
    verdicts = {c.name: c.verdict for c in callback.claims}
    assert callback.watch.should_stop and verdicts["stuck"] == "fail", verdicts
    fired = callback.watch.alerts[0]
    assert fired["detector"] == "stuck" and trainer.state.global_step == fired["step"] < 200


@pytest.mark.parametrize("module, extra, hidden", [
    ("lightning", "trainlab[lightning]", ("lightning", "lightning.pytorch", "pytorch_lightning")),
    ("transformers", "trainlab[transformers]", ("transformers",)),
])
def test_missing_framework_names_the_extra(monkeypatch, module, extra, hidden):
    import importlib
    import sys

    for name in hidden:  # None in sys.modules: `import name` raises ImportError, as if not installed
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, f"trainlab.integrations.{module}", raising=False)
    with pytest.raises(ImportError) as info:
        importlib.import_module(f"trainlab.integrations.{module}")
    assert f"pip install {extra}" in str(info.value) and "\n" not in str(info.value)


def test_callbacks_reject_bad_arguments_before_training(tmp_path):
    pytest.importorskip("lightning.pytorch", reason="Lightning not installed (pip install trainlab[lightning])")
    pytest.importorskip("transformers", reason="transformers not installed (pip install trainlab[transformers])")
    from trainlab.integrations import lightning, transformers

    for module in (lightning, transformers):
        with pytest.raises(WatchError, match="unknown detector 'stuk'; allowed: .*stuck"):
            module.HealthCallback(policies={"stuk": "stop"}, run_dir=tmp_path / "h")
    assert not (tmp_path / "h").exists()


def test_watch_nonfinite_always_stops(tmp_path):
    watch = Watch(run_dir=tmp_path, every=1)
    for step in range(3):
        watch.log(step, loss=0.5)
    assert not watch.should_stop
    alerts = watch.log(3, loss=torch.tensor(float("nan")))
    assert [a["detector"] for a in alerts] == ["nonfinite"] and watch.should_stop
