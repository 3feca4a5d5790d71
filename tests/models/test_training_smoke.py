"""One short training run per model on tiny phantom data keeps the training code alive."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from models.training.data import PREPROCESSING, SLICE_PREPROCESSING, Split, labels_to_grid  # noqa: E402
from models.training.phantoms import PhantomSeries, generate_series  # noqa: E402
from models.training.train import train  # noqa: E402
from workers.pipeline.preprocess import preprocess_frames  # noqa: E402


@pytest.fixture(scope="module")
def tiny_phantoms() -> list[PhantomSeries]:
    return [
        generate_series(seed, n_slices=3, n_nodules=2, size_range_mm=(8.0, 16.0))
        for seed in (8_000_001, 8_000_002)
    ]


@pytest.fixture(scope="module")
def tiny(tiny_phantoms: list[PhantomSeries]) -> Split:
    xs, ys = [], []
    for s in tiny_phantoms:
        xs.append(preprocess_frames(s.hu.astype(np.float32), SLICE_PREPROCESSING)[:, 0])
        ys.append(labels_to_grid(s.labels, PREPROCESSING.size))
    x = np.concatenate(xs).astype(np.float16)
    return Split(x, np.concatenate(ys), np.repeat(np.arange(2, dtype=np.int32), 3))


@pytest.mark.parametrize("name", ["unet", "segnet", "classifier"])
def test_one_epoch_trains_and_saves(name: str, tiny: Split, tmp_path: Path) -> None:
    log = train(
        name,
        minutes=5.0,
        seed=0,
        threads=1,
        data=tiny,
        val=tiny,
        out=tmp_path,
        max_steps=3,
        log_every=1,
    )
    assert log["steps"] == 3
    assert all(math.isfinite(h["loss"]) for h in log["history"])
    ckpt = torch.load(tmp_path / f"{name}.pt", map_location="cpu", weights_only=False)
    assert ckpt["log"]["steps"] == 3
    resumed = train(
        name,
        minutes=5.0,
        threads=1,
        data=tiny,
        val=tiny,
        out=tmp_path,
        max_steps=2,
        resume=True,
        log_every=1,
    )
    assert resumed["steps"] == 5 and len(resumed["sessions"]) == 2
    if name == "classifier":
        assert 0.0 <= log["validation"]["auc"] <= 1.0
    else:
        assert 0.0 <= log["validation"]["lung_dice"] <= 1.0


def test_lesion_balanced_recipe_trains_and_says_so(tiny: Split, tmp_path: Path) -> None:
    from models.training.train import lesion_slices

    # two series, two nodules each (8-16 mm): every lesion is a 3-D component of its series
    lesions = lesion_slices(tiny)
    assert 2 <= len(lesions) <= 4 and all(len(rows) >= 1 for rows in lesions)
    log = train(
        "unet", minutes=5.0, seed=0, threads=1, data=tiny, val=tiny, out=tmp_path,
        max_steps=2, log_every=1, lesion_balanced=True,
    )  # fmt: skip
    assert log["steps"] == 2 and all(math.isfinite(h["loss"]) for h in log["history"])
    assert log["commands"][0].endswith("--threads 1") and "--lesion-balanced" in log["commands"][0]


def test_stride2_classifier_trains_resumes_and_exports_its_architecture(
    tiny: Split, tmp_path: Path
) -> None:
    from models.training.export import load_trained

    log = train(
        "classifier", minutes=5.0, seed=0, threads=1, data=tiny, val=tiny, out=tmp_path,
        max_steps=2, log_every=1, evidence_stride=2,
    )  # fmt: skip
    assert log["config"]["evidence_stride"] == 2
    assert "--evidence-stride 2" in log["commands"][0] and "stride-2" in log["recipe"]
    # resuming without the option keeps the checkpoint's architecture
    resumed = train(
        "classifier", minutes=5.0, threads=1, data=tiny, val=tiny, out=tmp_path,
        max_steps=1, log_every=1, resume=True,
    )  # fmt: skip
    assert resumed["config"]["evidence_stride"] == 2 and resumed["steps"] == 3
    assert "--base" not in log["commands"][0]  # the default width is not spelled out
    net, _ = load_trained("classifier", tmp_path)
    assert net.evidence_stride == 2 and net.refine is not None
    cam = net.cam_lowres(torch.zeros(1, PREPROCESSING.channels, 256, 256))
    assert cam.shape[-1] == 128


def test_ema_saves_the_moving_average_of_the_weights(tiny: Split, tmp_path: Path) -> None:
    """With ``ema=d`` the saved weights are d × (after step 1) + (1 − d) × (after step 2).

    The three runs start from the same weights only because the seed sets the initial weights
    (they used to come from whatever state the global torch generator was in).
    """
    decay = 0.75
    runs = {}
    for tag, steps, ema in (("one", 1, None), ("two", 2, None), ("ema", 2, decay)):
        train(
            "unet", minutes=5.0, seed=0, threads=1, data=tiny, val=tiny, out=tmp_path / tag,
            max_steps=steps, log_every=1, ema=ema,
        )  # fmt: skip
        runs[tag] = torch.load(tmp_path / tag / "unet.pt", map_location="cpu", weights_only=False)
    weights = [
        k for k, v in runs["ema"]["state_dict"].items() if k.endswith(".weight") and v.ndim == 4
    ]
    assert weights
    for k in weights:
        one, two = runs["one"]["state_dict"][k], runs["two"]["state_dict"][k]
        assert not torch.equal(one, two)
        torch.testing.assert_close(runs["ema"]["state_dict"][k], decay * one + (1 - decay) * two)
    assert "--ema 0.75" in runs["ema"]["log"]["commands"][0]
    assert runs["ema"]["log"]["config"]["ema"] == decay
    # the option combines with the others (it once cut the classifier's stride option off)
    log = train(
        "classifier", minutes=5.0, seed=0, threads=1, data=tiny, val=tiny, out=tmp_path / "cls",
        max_steps=1, log_every=1, evidence_stride=2, ema=0.5,
    )  # fmt: skip
    assert log["config"]["evidence_stride"] == 2 and log["config"]["ema"] == 0.5
    with pytest.raises(ValueError, match="ema decay"):
        train("unet", data=tiny, val=tiny, out=tmp_path / "bad", max_steps=1, ema=1.0)


def test_base_width_is_an_option_kept_by_resume_and_export(tiny: Split, tmp_path: Path) -> None:
    from models.training.export import load_trained

    log = train(
        "classifier", minutes=5.0, seed=0, threads=1, data=tiny, val=tiny, out=tmp_path,
        max_steps=1, log_every=1, base=8,
    )  # fmt: skip
    assert log["config"]["base"] == 8 and "--base 8" in log["commands"][0]
    resumed = train(
        "classifier", minutes=5.0, threads=1, data=tiny, val=tiny, out=tmp_path,
        max_steps=1, log_every=1, resume=True,
    )  # fmt: skip
    assert resumed["config"]["base"] == 8 and "--base" not in resumed["commands"][1]
    net, _ = load_trained("classifier", tmp_path)
    assert net.stem[0].out_channels == 8


def test_min_evidence_raises_the_targets_of_small_cross_sections_only() -> None:
    from models.training.train import EVIDENCE_TARGET, evidence_target

    nodule = torch.zeros(2, 1, 32, 32)
    nodule[0, 0, 5, 5] = 1.0  # one pixel: one stride-4 cell
    nodule[1, 0, 8:24, 8:24] = 1.0  # 16 × 16 pixels: 16 fully covered cells
    plain, weight = evidence_target(nodule, 4)
    raised, weight_raised = evidence_target(nodule, 4, min_evidence=6.0)
    assert torch.equal(weight, weight_raised)
    # The single cell: half the target plus its 1/16 cover, raised to the whole minimum.
    assert math.isclose(float(plain[0, 0, 1, 1]), EVIDENCE_TARGET * 0.5 * (1 + 1 / 16))
    assert math.isclose(float(raised[0, 0, 1, 1]), 6.0)
    # The large cross-section already sums to 16 × EVIDENCE_TARGET > 6: unchanged.
    assert torch.equal(plain[1], raised[1])
    # Background cells keep their zero target.
    assert float(raised[0].sum()) == 6.0


def test_min_evidence_is_recorded_in_command_and_recipe(tiny: Split, tmp_path: Path) -> None:
    log = train(
        "classifier", minutes=5.0, seed=0, threads=1, data=tiny, val=tiny, out=tmp_path,
        max_steps=2, log_every=1, min_evidence=6.0,
    )  # fmt: skip
    assert log["config"]["min_evidence"] == 6.0
    assert "--min-evidence 6" in log["commands"][0]
    assert "raised to 6 / n" in log["recipe"]
    with pytest.raises(ValueError, match="min_evidence"):
        train("classifier", data=tiny, val=tiny, out=tmp_path, max_steps=1, min_evidence=0.0)


@pytest.fixture(scope="module")
def tiny_source(tiny_phantoms: list[PhantomSeries], tiny: Split) -> Split:
    """``tiny`` with its inputs at the source 512 × 512 resolution (labels on the 256 grid)."""
    from models.training.data import preprocessing_at

    pre = preprocessing_at(2).model_copy(update={"context_slices": 0})
    xs = [preprocess_frames(s.hu.astype(np.float32), pre)[:, 0] for s in tiny_phantoms]
    return Split(np.concatenate(xs).astype(np.float16), tiny.y, tiny.series)


def test_source_resolution_crops_cover_the_label_crop(tiny: Split, tiny_source: Split) -> None:
    """A 512-grid input crop, area-averaged 2 × 2, is the 256-grid crop of the same place."""
    from models.training.train import CropSampler

    assert tiny_source.input_scale == 2 and tiny.input_scale == 1
    fine = CropSampler(tiny_source, np.random.default_rng(3), 0.5, per_slice=True)
    coarse = CropSampler(tiny, np.random.default_rng(3), 0.5, per_slice=True)
    for _ in range(3):  # same seed, same draws: the two samplers pick the same crops
        xf, yf = fine.batch(4, 32)
        xc, yc = coarse.batch(4, 32)
        assert xf.shape == (4, PREPROCESSING.channels, 64, 64) and yf.shape == (4, 32, 32)
        assert torch.equal(yf, yc)
        pooled = torch.nn.functional.avg_pool2d(xf, 2)
        assert float((pooled - xc).abs().max()) < 2e-3  # float16 storage of both grids
    xs, ys = fine.whole_slices(2)
    assert xs.shape[-1] == 512 and ys.shape[-1] == 256


def test_source_resolution_classifier_trains_resumes_and_exports(
    tiny: Split, tiny_source: Split, tmp_path: Path
) -> None:
    from models.training.export import load_trained

    log = train(
        "classifier", minutes=5.0, seed=0, threads=1, data=tiny_source, val=tiny_source,
        out=tmp_path, max_steps=2, log_every=1, input_scale=2,
    )  # fmt: skip
    assert log["config"]["input_scale"] == 2 and "--input-scale 2" in log["commands"][0]
    assert "512 × 512 resolution" in log["recipe"]
    assert 0.0 <= log["validation"]["pointing_game_nodule_slices"] <= 1.0
    resumed = train(
        "classifier", minutes=5.0, threads=1, data=tiny_source, val=tiny_source, out=tmp_path,
        max_steps=1, log_every=1, resume=True,
    )  # fmt: skip
    assert resumed["config"]["input_scale"] == 2 and resumed["steps"] == 3
    net, _ = load_trained("classifier", tmp_path)
    assert net.input_scale == 2
    cam = net.cam_lowres(torch.zeros(1, PREPROCESSING.channels, 512, 512))
    assert cam.shape[-1] == 64  # the evidence map stays on the label grid, stride 4
    with pytest.raises(ValueError, match="input_scale"):
        train("classifier", data=tiny, val=tiny, out=tmp_path / "bad", max_steps=1, input_scale=2)


def test_only_the_classifier_takes_source_resolution() -> None:
    from models.training.train import build_model

    with pytest.raises(ValueError, match="label grid"):
        build_model("unet", 8, input_scale=2)


def test_mixed_precision_and_compiled_forward_train_and_say_so(tiny: Split, tmp_path: Path) -> None:
    """``bf16`` and ``compile_forward`` change the step's arithmetic, not the recipe: the run
    trains, records both in its config and command, and saves float32 weights that load."""
    from models.training.export import load_trained

    log = train(
        "segnet", minutes=5.0, seed=0, threads=1, data=tiny, val=tiny, out=tmp_path,
        max_steps=2, log_every=1, bf16=True, compile_forward=True,
    )  # fmt: skip
    assert log["steps"] == 2 and all(math.isfinite(h["loss"]) for h in log["history"])
    assert log["config"]["bf16"] is True and log["config"]["compile"] is True
    assert "--bf16 --compile" in log["commands"][0]
    net, _ = load_trained("segnet", tmp_path)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    cls = train(
        "classifier", minutes=5.0, seed=0, threads=1, data=tiny, val=tiny,
        out=tmp_path / "cls", max_steps=1, log_every=1, bf16=True,
    )  # fmt: skip
    assert cls["steps"] == 1 and "--bf16" in cls["commands"][0]
    with pytest.raises(ValueError, match="segmenters"):
        train("classifier", data=tiny, val=tiny, out=tmp_path / "x", compile_forward=True)
