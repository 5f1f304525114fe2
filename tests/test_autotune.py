"""engine/autotune.py: explicit settings win, the fastest candidate is chosen (fake timers), the
process and disk caches spare a second measurement, a damaged cache is ignored, a resumed run keeps
its precision, kernel and stem layout, a run records its choice in env.json, and rank 0 decides for
all ranks. The conv stem's input layout is timed only for a model that has a stem."""
import json
import os
import sys
import time

import pytest
import torch

from conftest import tiny_config, write_shapes
from vitlab.engine import autotune
from vitlab.engine.args import load_run_config
from vitlab.engine.runtime import Runtime
from vitlab.errors import ConfigError
from vitlab.model import VisionTransformer
from vitlab.train import run_training

CPU = torch.device("cpu")
CFG = tiny_config()
REAL_WAITS = autotune.runqueue_waits  # the own_cache fixture replaces it with an idle machine's
STEM_CFG = tiny_config(conv_stem=(8, 16))  # 16 px, patch 4: two stride-2 layers, a 1x1 projection


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test gets an empty process memo and its own cache dir (never the user's)."""
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "_MEMO", {})
    fake_wait(monkeypatch, 0.0)  # the machine running the tests may be busy: caching must not depend on it
    return tmp_path / "cache" / autotune.CACHE_FILE


def fake_wait(monkeypatch, seconds_per_call: float) -> None:
    """runqueue_waits() as if this process's one thread waited `seconds_per_call` between two readings."""
    readings = iter(range(10**6))
    monkeypatch.setattr(autotune, "runqueue_waits", lambda: {"1": int(next(readings) * seconds_per_call * 1e9)})


def fake_measure(seconds: dict[str, float], calls: list):
    """A measure() that returns `seconds` for the candidates it is asked about and logs each call."""
    def measure(cfg, shape, device, precisions, attns):
        calls.append((tuple(precisions), tuple(attns)))
        return {f"{p}/{a}": seconds[f"{p}/{a}"] for p in precisions for a in attns}
    return measure


def fake_measure_stem(seconds: dict[str, float], calls: list):
    """A measure_stem() that returns `seconds` by layout and logs the precision it was asked about."""
    def measure_stem(cfg, batch, device, precision):
        calls.append(precision)
        return dict(seconds)
    return measure_stem


def forbid_measuring(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("measured although it should not have")
    monkeypatch.setattr(autotune, "measure", refuse)
    monkeypatch.setattr(autotune, "measure_stem", refuse)


def bf16_here(monkeypatch, fast: bool) -> None:
    monkeypatch.setattr(autotune, "fast_bf16_available", lambda device_type: fast)


def test_explicit_settings_are_kept_without_measuring(monkeypatch):
    forbid_measuring(monkeypatch)
    assert autotune.choose(CFG, 16, CPU, "fp32", "sdpa") == autotune.Choice("fp32", "sdpa", "explicit")
    assert autotune.choose(CFG, 16, CPU, "bf16", "math") == autotune.Choice("bf16", "math", "explicit")
    bf16_here(monkeypatch, False)  # fp32 is the only precision worth having here: nothing to time
    assert autotune.choose(CFG, 16, CPU, "auto", "math").precision == "fp32"
    with pytest.raises(ConfigError, match="fp16"):
        autotune.choose(CFG, 16, CPU, "fp16", "auto")  # fp16 stays CUDA-only


def test_only_the_auto_setting_is_measured(monkeypatch):
    bf16_here(monkeypatch, True)
    calls = []
    seconds = {"fp32/sdpa": 3, "fp32/math": 2, "bf16/sdpa": 4, "bf16/math": 1}
    monkeypatch.setattr(autotune, "measure", fake_measure(seconds, calls))
    assert autotune.choose(CFG, 16, CPU, "fp32", "auto").attn_impl == "math"
    assert autotune.choose(CFG, 16, CPU, "auto", "sdpa").precision == "fp32"  # 3 < 4
    assert calls == [(("fp32",), ("sdpa", "math")), (("fp32", "bf16"), ("sdpa",))]


@pytest.mark.parametrize("fast_bf16, seconds, expected", [
    (True, {"fp32/sdpa": 3, "fp32/math": 2, "bf16/sdpa": 4, "bf16/math": 1}, ("bf16", "math")),
    (True, {"fp32/sdpa": 1, "fp32/math": 2, "bf16/sdpa": 4, "bf16/math": 3}, ("fp32", "sdpa")),
    (False, {"fp32/sdpa": 2, "fp32/math": 1}, ("fp32", "math")),  # no bf16 candidate without bf16 units
])
def test_the_fastest_candidate_wins(monkeypatch, fast_bf16, seconds, expected):
    bf16_here(monkeypatch, fast_bf16)
    monkeypatch.setattr(autotune, "measure", fake_measure(seconds, []))
    choice = autotune.choose(CFG, 16, CPU)
    assert (choice.precision, choice.attn_impl, choice.source) == (*expected, "measured")
    assert choice.timings == {k: v * 1e3 for k, v in seconds.items()}


@pytest.mark.parametrize("fast_attn", ["sdpa", "math"])
def test_the_faster_kernel_wins_under_a_fake_timer(monkeypatch, fast_attn):
    """Through the real measure(): only the per-trial timer is fake; it reads the kernel each
    trial's block runs with."""
    bf16_here(monkeypatch, False)

    def trial(block, x, precision):
        assert x.shape == (autotune.cache_key(CFG, 16, CPU, ["fp32"], ["sdpa", "math"])[1]["trial_batch"],
                           CFG.seq_len, CFG.embed_dim)
        return 0.001 if block.attn.impl == fast_attn else 0.002
    monkeypatch.setattr(autotune, "trial_seconds", trial)
    choice = autotune.choose(CFG, 16, CPU)
    assert choice.attn_impl == fast_attn and choice.source == "measured"


def test_a_real_measurement_is_quick_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    choice = autotune.choose(CFG, 32, CPU, "fp32", "auto", cache_file=None)
    assert torch.equal(torch.rand(3), want)  # measuring or reading the cache computes the same run
    assert choice.source == "measured" and set(choice.timings) == {"fp32/sdpa", "fp32/math"}
    assert all(0 < ms < 5000 for ms in choice.timings.values())
    assert choice.shape["tokens"] == CFG.seq_len and 1 <= choice.shape["trial_batch"] <= 32


def test_two_identical_calls_in_one_process_measure_once(monkeypatch):
    calls = []
    monkeypatch.setattr(autotune, "measure", fake_measure({"fp32/sdpa": 1, "fp32/math": 2}, calls))
    first = autotune.choose(CFG, 16, CPU, "fp32", cache_file=None)
    second = autotune.choose(CFG, 16, CPU, "fp32", cache_file=None)
    assert len(calls) == 1 and (first.source, second.source) == ("measured", "cache")
    assert (first.precision, first.attn_impl) == (second.precision, second.attn_impl)
    autotune.choose(CFG, 17, CPU, "fp32", cache_file=None)  # the same power-of-two batch bucket
    autotune.choose(CFG, 64, CPU, "fp32", cache_file=None)  # another bucket: measured
    autotune.choose(tiny_config(embed_dim=64), 16, CPU, "fp32", cache_file=None)  # another shape
    assert len(calls) == 3


def test_the_disk_cache_spares_the_next_process_a_measurement(monkeypatch, own_cache):
    monkeypatch.setattr(autotune, "measure", fake_measure({"fp32/sdpa": 2, "fp32/math": 1}, []))
    assert autotune.choose(CFG, 16, CPU, "fp32").source == "measured"
    entry, = json.loads(own_cache.read_text()).values()
    assert entry["attn_impl"] == "math"
    monkeypatch.setattr(autotune, "_MEMO", {})  # a new process
    forbid_measuring(monkeypatch)
    choice = autotune.choose(CFG, 16, CPU, "fp32")
    assert (choice.attn_impl, choice.source, choice.timings) == ("math", "cache", {"fp32/sdpa": 2e3, "fp32/math": 1e3})


@pytest.mark.parametrize("damage", [b"{not json", b"\xff\xfe", b"[1, 2]", b"null", "bad entry"])
def test_a_damaged_cache_file_is_measured_over(monkeypatch, own_cache, damage):
    monkeypatch.setattr(autotune, "measure", fake_measure({"fp32/sdpa": 2, "fp32/math": 1}, []))
    key = autotune.cache_key(CFG, 16, CPU, ["fp32"], ["sdpa", "math"])[0]
    own_cache.parent.mkdir(parents=True)
    if damage == "bad entry":  # readable, but naming a candidate that is not one
        damage = json.dumps({key: {"precision": "fp64", "attn_impl": "sdpa"}}).encode()
    own_cache.write_bytes(damage)
    assert autotune.choose(CFG, 16, CPU, "fp32").source == "measured"
    assert json.loads(own_cache.read_text())[key]["attn_impl"] == "math"  # repaired


def test_a_measurement_on_a_busy_cpu_serves_its_run_but_is_not_cached(monkeypatch, own_cache):
    calls = []
    monkeypatch.setattr(autotune, "measure", fake_measure({"fp32/sdpa": 2, "fp32/math": 1}, calls))
    fake_wait(monkeypatch, 100.0)  # far more waiting than the (instant) fake measurement's wall time
    busy = autotune.choose(CFG, 16, CPU, "fp32")
    assert (busy.attn_impl, busy.source, busy.busy) == ("math", "measured", True) and busy.wait_share > 1
    assert not own_cache.exists()  # nothing written
    assert "held the CPU" in autotune.busy_note(busy.to_dict()) and "math" in autotune.busy_note(busy.to_dict())
    assert autotune.choose(CFG, 16, CPU, "fp32").source == "measured"  # not kept in this process either
    fake_wait(monkeypatch, 0.0)  # then the machine is idle
    idle = autotune.choose(CFG, 16, CPU, "fp32")
    assert (idle.source, idle.busy, idle.wait_share, len(calls)) == ("measured", False, 0.0, 3)
    assert autotune.busy_note(idle.to_dict()) is None
    entry, = json.loads(own_cache.read_text()).values()
    assert (entry["attn_impl"], entry["wait_share"]) == ("math", 0.0)
    monkeypatch.setattr(autotune, "_MEMO", {})
    assert autotune.choose(CFG, 16, CPU, "fp32").source == "cache"
    assert len(calls) == 3


@pytest.mark.parametrize("record, source", [({}, "measured"),  # from before the load was recorded
                                            ({"wait_share": 0.5}, "measured"),  # busy (vitlab never writes one)
                                            ({"wait_share": None}, "cache"),  # unknown: no schedstat there
                                            ({"wait_share": True}, "cache")])  # not a number: unknown, not 1.0
def test_a_cache_entry_serves_only_with_an_idle_or_unknown_record(monkeypatch, own_cache, record, source):
    key = autotune.cache_key(CFG, 16, CPU, ["fp32"], ["sdpa", "math"])[0]
    own_cache.parent.mkdir(parents=True)
    own_cache.write_text(json.dumps({key: {"precision": "fp32", "attn_impl": "sdpa", "timings": {}, **record}}))
    monkeypatch.setattr(autotune, "measure", fake_measure({"fp32/sdpa": 2, "fp32/math": 1}, []))
    choice = autotune.choose(CFG, 16, CPU, "fp32")
    assert (choice.source, choice.attn_impl) == (source, "math" if source == "measured" else "sdpa")
    assert choice.wait_share == (0.0 if source == "measured" else None)
    if source == "measured":  # written over, with the idle record
        assert json.loads(own_cache.read_text())[key]["wait_share"] == 0.0


def test_the_wait_share_is_the_waiting_per_thread_and_second_and_busy_above_the_bar(monkeypatch):
    now = {"1": 3 * 10**8, "2": 10**8, "3": 10**8}  # thread 3 started meanwhile
    monkeypatch.setattr(autotune, "runqueue_waits", lambda: now)
    monkeypatch.setattr(autotune.time, "perf_counter", lambda: 11.0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(autotune, "affinity_cpus", lambda: 2)
    monkeypatch.setattr(autotune, "cpu_quota", lambda: None)
    assert autotune.wait_share({"1": 0, "2": 0}, 10.0, CPU) == 0.25  # 0.5 s waited over 1 s x 2 threads
    monkeypatch.setattr(autotune, "cpu_quota", lambda: 2.0)
    assert autotune.wait_share({"1": 0, "2": 0}, 10.0, CPU) == 0.25  # a quota of 2 CPUs holds 2 threads
    for start, now, device, cpus, quota in (({"1": 0, "9": 0}, {"1": 1}, CPU, 2, None),  # thread 9 ended
                                            ({"1": 0}, {"1": 1}, torch.device("cuda"), 2, None),
                                            ({"1": 0}, {"1": 1}, CPU, 1, None),  # 2 threads on 1 CPU wait for each other
                                            ({"1": 0}, {"1": 1}, CPU, 2, 1.5),  # or for the quota's next period
                                            (None, {"1": 1}, CPU, 2, None)):
        monkeypatch.setattr(autotune, "runqueue_waits", lambda now=now: now)
        monkeypatch.setattr(autotune, "affinity_cpus", lambda cpus=cpus: cpus)
        monkeypatch.setattr(autotune, "cpu_quota", lambda quota=quota: quota)
        assert autotune.wait_share(start, 10.0, device) is None
    busy = {share: autotune.Choice("fp32", "sdpa", "measured", wait_share=share).busy for share in (0.15, 0.2, 0.25, None)}
    assert busy == {0.15: False, 0.2: False, 0.25: True, None: False}
    # one rule for the Choice, the cache and the log line: a boolean is not a share
    assert [autotune.is_busy(s) for s in (0.25, 1, True, "0.5", None)] == [True, True, False, False, False]
    assert autotune.busy_note({"wait_share": True}) is None and autotune.busy_note({"wait_share": 1}) is not None


@pytest.mark.skipif(REAL_WAITS() is None or not hasattr(os, "sched_setaffinity"),
                    reason="needs Linux's per-thread schedstat and CPU affinity")
def test_the_wait_share_sees_a_competitor_for_the_same_cpu(monkeypatch):
    import subprocess
    monkeypatch.setattr(autotune, "runqueue_waits", REAL_WAITS)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # the one thread spinning below: this one

    def spin_share(seconds: float) -> float:
        start, t0 = autotune.runqueue_waits(), time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            pass
        return autotune.wait_share(start, t0, CPU)

    mine = os.sched_getaffinity(0)
    cpu = min(mine)
    os.sched_setaffinity(0, {cpu})  # this thread and a spinning child on one CPU
    try:
        alone = spin_share(0.3)
        child = subprocess.Popen([sys.executable, "-c", "import os, time\nos.sched_setaffinity(0, {%d})\n"
                                  "t = time.time()\nwhile time.time() - t < 5: pass" % cpu])
        try:
            time.sleep(0.3)  # the child is up and spinning
            shared = spin_share(0.6)
        finally:
            child.kill()
            child.wait()
    finally:
        os.sched_setaffinity(0, mine)
    # one CPU shared by two spinning threads: ~0.5 (an idle machine gives ~0 alone; a loaded one more)
    assert shared > autotune.BUSY_WAIT_SHARE and shared > alone + 0.2, (alone, shared)


def test_an_unwritable_cache_dir_only_skips_saving(monkeypatch, tmp_path):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "a_file" / "sub"))  # cannot be created
    monkeypatch.setattr(autotune, "measure", fake_measure({"fp32/sdpa": 2, "fp32/math": 1}, []))
    assert autotune.choose(CFG, 16, CPU, "fp32").attn_impl == "math"


def test_cache_dir_order(monkeypatch, tmp_path):
    monkeypatch.delenv("VITLAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_dir() == tmp_path / "xdg" / "vitlab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert autotune.cache_dir() == autotune.Path.home() / ".cache" / "vitlab"


def runtime_args(precision="auto", attn_impl="auto"):
    return load_run_config(None, [f"runtime.precision={precision}", f"runtime.attn_impl={attn_impl}"]).runtime


def test_a_resumed_run_keeps_its_precision_and_kernel(monkeypatch, tmp_path):
    forbid_measuring(monkeypatch)
    model = VisionTransformer(CFG)
    (tmp_path / "env.json").write_text(json.dumps({"autotune": {"precision": "bf16", "attn_impl": "math"}}))
    rt = autotune.tune_run(model, runtime_args(), Runtime(CPU, "fp32"), 16, tmp_path, {"precision": "bf16"})
    assert (rt.precision, rt.choice["attn_impl"], rt.choice["source"]) == ("bf16", "math", "resumed")
    assert {b.attn.impl for b in model.blocks} == {"math"}
    # an explicit setting still wins (and Trainer.restore names the mismatch)
    rt = autotune.tune_run(model, runtime_args("fp32", "sdpa"), Runtime(CPU, "fp32"), 16, tmp_path,
                           {"precision": "bf16"})
    assert (rt.precision, rt.choice["attn_impl"], rt.choice["source"]) == ("fp32", "sdpa", "explicit")


def test_a_tiny_run_records_its_choice_in_env_json(monkeypatch, tmp_path):
    calls, stem_calls = [], []
    monkeypatch.setattr(autotune, "measure", fake_measure({"fp32/sdpa": 2, "fp32/math": 1}, calls))
    monkeypatch.setattr(autotune, "measure_stem", fake_measure_stem({"channels_last": 3, "contiguous": 1}, stem_calls))
    seen = []  # the stem's input layout in every training and evaluation forward
    real_forward = autotune.PatchEmbed.forward
    monkeypatch.setattr(autotune.PatchEmbed, "forward", lambda self, x: seen.append(self.channels_last) or real_forward(self, x))
    data = write_shapes(tmp_path / "shapes", ("h", "v", "d"), 10)  # colour images: the stem's layout is timed
    sets = {"data.name": str(data), "data.val_size": 6, "model.img_size": 16, "model.depth": 1, "model.embed_dim": 16,
            "model.num_heads": 2, "model.conv_stem": "[8,16]", "train.batch_size": 8, "train.epochs": 1,
            "runtime.progress": False, "runtime.precision": "fp32", "train.resolution_schedule": "null"}
    settings = load_run_config("cifar10", [f"{k}={v}" for k, v in sets.items()])
    run_training(settings, tmp_path / "run")
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert len(calls) == 1 and stem_calls == ["fp32"]
    record = env["autotune"]
    assert (record["precision"], record["attn_impl"], record["source"]) == ("fp32", "math", "measured")
    assert record["stem_layout"] == "contiguous"
    assert record["timings"] == {"fp32/sdpa": 2e3, "fp32/math": 1e3, "stem/channels_last": 3e3, "stem/contiguous": 1e3}
    assert env["precision"] == "fp32"
    assert seen and not any(seen)  # training, validation and the final test all used the chosen layout


def test_a_run_timed_on_a_busy_cpu_says_so_and_records_the_wait(monkeypatch, tmp_path, own_cache, capsys):
    monkeypatch.setattr(autotune, "measure", fake_measure({"fp32/sdpa": 2, "fp32/math": 1}, []))
    fake_wait(monkeypatch, 100.0)
    data = write_shapes(tmp_path / "shapes", ("h", "v", "d"), 10)
    sets = {"data.name": str(data), "data.val_size": 6, "model.img_size": 16, "model.depth": 1, "model.embed_dim": 16,
            "model.num_heads": 2, "model.conv_stem": "[]", "train.batch_size": 8, "train.epochs": 1,
            "runtime.progress": False, "runtime.precision": "fp32", "train.resolution_schedule": "null"}
    run_training(load_run_config("cifar10", [f"{k}={v}" for k, v in sets.items()]), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "env.json").read_text())["autotune"]
    assert (record["attn_impl"], record["source"]) == ("math", "measured") and record["wait_share"] > 1
    assert "autotune timed its candidates while other processes held the CPU" in capsys.readouterr().out
    assert not own_cache.exists()


# ---- two ranks: rank 0 decides ---------------------------------------------------------------
def _rank_main(rank: int, port: int, cache: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), VITLAB_CACHE=cache)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # each rank's timer disagrees: rank 0 finds math faster, rank 1 (if it measured) sdpa
        seconds = {"fp32/sdpa": 2, "fp32/math": 1} if rank == 0 else {"fp32/sdpa": 1, "fp32/math": 2}
        layouts = {"channels_last": 2, "contiguous": 1} if rank == 0 else {"channels_last": 1, "contiguous": 2}
        autotune.measure = fake_measure(seconds, [])
        autotune.measure_stem = fake_measure_stem(layouts, [])
        choice = autotune.choose(STEM_CFG, 16, CPU, "fp32", "auto", Runtime(CPU, "fp32", rank, 2))
        results[rank] = (choice.precision, choice.attn_impl, choice.source, choice.stem_layout)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
def test_every_rank_uses_rank_0s_choice(tmp_path):
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    mp.spawn(_rank_main, args=(29531, str(tmp_path / "cache"), results), nprocs=2)
    assert results[0] == results[1] == ("fp32", "math", "measured", "contiguous")


def test_patch_dropout_shortens_the_timed_sequence():
    from types import SimpleNamespace
    cfg = SimpleNamespace(num_patches=64, num_prefix_tokens=1, patch_drop_rate=0.5)
    assert autotune.train_tokens(cfg) == 1 + 32  # layers.PatchDropout keeps round(64 * 0.5) patches
    assert autotune.train_tokens(SimpleNamespace(num_patches=64, num_prefix_tokens=1)) == 65


@pytest.mark.parametrize("math_s, expected", [(0.97, "sdpa"), (0.9, "math")])
def test_the_default_stays_unless_another_is_clearly_faster(monkeypatch, math_s, expected):
    """Timing noise must not flip a run's kernel: fp32's default (the fixed rule: sdpa) is kept
    unless another candidate is autotune.MARGIN faster."""
    bf16_here(monkeypatch, False)
    monkeypatch.setattr(autotune, "measure", fake_measure({"fp32/sdpa": 1.0, "fp32/math": math_s}, []))
    assert autotune.choose(CFG, 16, CPU).attn_impl == expected


def test_the_cache_key_holds_what_changes_the_kernels():
    key = autotune.cache_key(CFG, 16, CPU, ["fp32"], ["sdpa", "math"])[0]
    for changed in (CFG.replace(attn_drop_rate=0.1), CFG.replace(drop_rate=0.1), CFG.replace(init_values=1e-4),
                    CFG.replace(qkv_bias=False), CFG.replace(embed_dim=64), CFG.replace(patch_drop_rate=0.5)):
        assert autotune.cache_key(changed, 16, CPU, ["fp32"], ["sdpa", "math"])[0] != key, changed
    assert autotune.cache_key(CFG.replace(num_classes=3), 16, CPU, ["fp32"], ["sdpa", "math"])[0] == key


def test_a_run_from_before_autotune_resumes_with_the_fixed_rule(monkeypatch, tmp_path):
    forbid_measuring(monkeypatch)
    model = VisionTransformer(CFG, attn_impl="sdpa")
    (tmp_path / "env.json").write_text(json.dumps({"cpu": "x"}))  # no "autotune" record
    rt = autotune.tune_run(model, runtime_args(), Runtime(CPU, "fp32"), 16, tmp_path, {"precision": "bf16"})
    assert (rt.precision, rt.choice["attn_impl"], rt.choice["source"]) == ("bf16", "auto", "resumed")
    assert {b.attn.impl for b in model.blocks} == {"auto"}


# ---- the conv stem's input layout ------------------------------------------------------------
def test_only_a_model_with_a_stem_on_colour_images_has_its_layout_timed(monkeypatch):
    forbid_measuring(monkeypatch)
    assert autotune.choose(CFG, 16, CPU, "fp32", "sdpa") == autotune.Choice("fp32", "sdpa", "explicit", stem_layout="channels_last")
    grey = tiny_config(conv_stem=(8, 16), in_chans=1)  # a (B, 1, H, W) image is both layouts at once
    assert autotune.choose(grey, 16, CPU, "fp32", "sdpa").source == "explicit"
    assert autotune.choose(STEM_CFG, 16, CPU, "fp32", "sdpa", stem_layout="contiguous").stem_layout == "contiguous"
    stem_calls = []
    monkeypatch.setattr(autotune, "measure_stem", fake_measure_stem({"channels_last": 2, "contiguous": 1}, stem_calls))
    choice = autotune.choose(STEM_CFG, 16, CPU, "fp32", "sdpa")  # the block needs no timing: only the stem
    assert (choice.precision, choice.attn_impl, choice.stem_layout, choice.source) == ("fp32", "sdpa", "contiguous", "measured")
    assert choice.timings == {"stem/channels_last": 2e3, "stem/contiguous": 1e3} and stem_calls == ["fp32"]
    with pytest.raises(ConfigError, match="stem_layout='nhwc'"):
        autotune.choose(STEM_CFG, 16, CPU, "fp32", "sdpa", stem_layout="nhwc")


def test_the_stem_is_timed_under_the_precision_the_run_will_use(monkeypatch):
    bf16_here(monkeypatch, True)
    stem_calls = []
    monkeypatch.setattr(autotune, "measure", fake_measure({"fp32/sdpa": 3, "fp32/math": 3, "bf16/sdpa": 2, "bf16/math": 1}, []))
    monkeypatch.setattr(autotune, "measure_stem", fake_measure_stem({"channels_last": 1, "contiguous": 2}, stem_calls))
    choice = autotune.choose(STEM_CFG, 16, CPU)
    assert (choice.precision, choice.stem_layout) == ("bf16", "channels_last") and stem_calls == ["bf16"]


@pytest.mark.parametrize("contiguous_s, expected", [(0.93, "channels_last"), (0.85, "contiguous")])
def test_channels_last_stays_unless_contiguous_is_clearly_faster(monkeypatch, contiguous_s, expected):
    monkeypatch.setattr(autotune, "measure_stem", fake_measure_stem({"channels_last": 1.0, "contiguous": contiguous_s}, []))
    assert autotune.choose(STEM_CFG, 16, CPU, "fp32", "sdpa").stem_layout == expected


def test_the_stem_layout_is_cached_under_the_stem_shapes(monkeypatch, own_cache):
    monkeypatch.setattr(autotune, "measure_stem", fake_measure_stem({"channels_last": 2, "contiguous": 1}, []))
    assert autotune.choose(STEM_CFG, 16, CPU, "fp32", "sdpa").source == "measured"
    entry, = json.loads(own_cache.read_text()).values()
    assert entry["stem_layout"] == "contiguous"
    monkeypatch.setattr(autotune, "_MEMO", {})  # a new process
    forbid_measuring(monkeypatch)
    choice = autotune.choose(STEM_CFG, 16, CPU, "fp32", "sdpa")
    assert (choice.stem_layout, choice.source) == ("contiguous", "cache")
    key = autotune.cache_key(STEM_CFG, 16, CPU, ["fp32"], ["sdpa"], stem_auto=True)[0]
    for changed in (STEM_CFG.replace(conv_stem=(8, 32)), STEM_CFG.replace(stem_full_res=1),  # the same tokens
                    STEM_CFG.replace(in_chans=4, mean=(0.5,) * 4, std=(0.5,) * 4)):
        assert changed.seq_len == STEM_CFG.seq_len
        assert autotune.cache_key(changed, 16, CPU, ["fp32"], ["sdpa"], stem_auto=True)[0] != key, changed
    # a vitlab that did not time the layout wrote its entries under the key without the stem part:
    # they answer a run with an explicit layout, but one with an auto layout measures
    old = autotune.cache_key(STEM_CFG, 16, CPU, ["fp32"], ["sdpa", "math"])[0]
    assert old != autotune.cache_key(STEM_CFG, 16, CPU, ["fp32"], ["sdpa", "math"], stem_auto=True)[0]
    own_cache.write_text(json.dumps({old: {"precision": "fp32", "attn_impl": "math", "wait_share": 0.0}}))
    monkeypatch.setattr(autotune, "_MEMO", {})
    choice = autotune.choose(STEM_CFG, 16, CPU, "fp32", stem_layout="contiguous")
    assert (choice.attn_impl, choice.stem_layout, choice.source) == ("math", "contiguous", "cache")
    monkeypatch.setattr(autotune, "measure", fake_measure({"fp32/sdpa": 1, "fp32/math": 2}, []))
    monkeypatch.setattr(autotune, "measure_stem", fake_measure_stem({"channels_last": 1, "contiguous": 2}, []))
    choice = autotune.choose(STEM_CFG, 16, CPU, "fp32")
    assert (choice.attn_impl, choice.stem_layout, choice.source) == ("sdpa", "channels_last", "measured")


def test_an_explicit_layout_wins_over_this_processs_earlier_answer(monkeypatch):
    """Models of one block shape share a key when the layout is not timed: the answer kept for one
    (here a stem-less model's) must not hand its layout to the next."""
    monkeypatch.setattr(autotune, "measure", fake_measure({"fp32/sdpa": 2, "fp32/math": 1}, []))
    assert autotune.choose(CFG, 16, CPU, "fp32").stem_layout == "channels_last"
    choice = autotune.choose(STEM_CFG, 16, CPU, "fp32", stem_layout="contiguous")
    assert (choice.attn_impl, choice.stem_layout, choice.source) == ("math", "contiguous", "cache")


def test_a_real_stem_measurement_times_both_layouts_and_leaves_the_rng_alone():
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    choice = autotune.choose(STEM_CFG, 32, CPU, "fp32", "sdpa", cache_file=None)
    assert torch.equal(torch.rand(3), want)
    assert set(choice.timings) == {"stem/channels_last", "stem/contiguous"}
    assert all(0 < ms < 5000 for ms in choice.timings.values()) and choice.stem_layout in ("channels_last", "contiguous")
    assert 1 <= choice.shape["stem_trial_batch"] <= 32


@pytest.mark.parametrize("env, expected", [({"autotune": {"attn_impl": "sdpa", "stem_layout": "contiguous"}}, "contiguous"),
                                           ({"autotune": {"attn_impl": "sdpa"}}, "channels_last"),  # before the layout was timed
                                           ({"autotune": {"attn_impl": "sdpa", "stem_layout": "nhwc"}}, "channels_last")])
def test_a_resumed_run_keeps_its_stem_layout(monkeypatch, tmp_path, env, expected):
    forbid_measuring(monkeypatch)
    model = VisionTransformer(STEM_CFG)
    (tmp_path / "env.json").write_text(json.dumps(env))
    rt = autotune.tune_run(model, runtime_args(), Runtime(CPU, "fp32"), 16, tmp_path, {"precision": "bf16"})
    assert (rt.choice["stem_layout"], rt.choice["source"]) == (expected, "resumed")
    assert model.patch_embed.channels_last == (expected == "channels_last")


def test_apply_choice_gives_the_model_the_recorded_kernel_and_layout():
    model = VisionTransformer(STEM_CFG)
    assert autotune.apply_choice(model, {"attn_impl": "math", "stem_layout": "contiguous"}) is model
    assert {b.attn.impl for b in model.blocks} == {"math"} and model.patch_embed.channels_last is False
    autotune.apply_choice(model, None, "sdpa")  # nothing recorded: the setting's kernel, the default layout
    assert {b.attn.impl for b in model.blocks} == {"sdpa"} and model.patch_embed.channels_last is True
    with pytest.raises(ConfigError, match="nchw"):
        autotune.apply_choice(model, {"attn_impl": "math", "stem_layout": "nchw"})
