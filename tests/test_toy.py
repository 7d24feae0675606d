"""Chapter 05's data, base model and training loop, and the script that made the base model."""

from __future__ import annotations

import pytest
import torch

from lokr_edu.toy import (
    BASE_WEIGHTS,
    TASKS,
    accuracy,
    load_base_model,
    load_digits,
    main,
    make_base_model,
    pretrain,
    split_validation,
    train,
)


def test_tasks_share_labels_and_split_but_not_pixels() -> None:
    upright, rotated, mirrored = load_digits("upright"), load_digits("rot90"), load_digits("mirror")
    assert upright.x_train.shape == (1204, 64) and upright.x_test.shape == (593, 64)
    assert torch.equal(upright.y_test, rotated.y_test)
    image = upright.x_test[0].reshape(8, 8)
    assert torch.equal(rotated.x_test[0].reshape(8, 8), torch.rot90(image, 1))
    assert torch.equal(mirrored.x_test[0].reshape(8, 8), image.flip(-1))
    assert 0.0 <= upright.x_train.min() and upright.x_train.max() <= 1.0


def test_shipped_base_model_is_good_upright_and_bad_rotated() -> None:
    assert BASE_WEIGHTS.suffix == ".safetensors"
    model = load_base_model()
    assert sum(p.numel() for p in model.parameters()) == 26_122
    upright, rotated = load_digits("upright"), load_digits("rot90")
    assert accuracy(model, upright.x_test, upright.y_test) > 0.9
    assert accuracy(model, rotated.x_test, rotated.y_test) < 0.3


def test_pretrain_script_runs_and_writes_loadable_safetensors(tmp_path, capsys) -> None:
    out = tmp_path / "mlp.safetensors"
    assert main(["pretrain", "--out", str(out), "--steps", "5"]) == 0
    assert "upright test accuracy" in capsys.readouterr().out
    model = load_base_model(out)
    assert set(model.state_dict()) == set(make_base_model().state_dict())


def test_pretraining_learns() -> None:
    torch.manual_seed(0)
    assert (
        pretrain(out=BASE_WEIGHTS.parent.parent.parent / "build" / "tmp_mlp.safetensors", steps=200)
        > 0.8
    )


def test_training_is_reproducible_and_reduces_the_loss() -> None:
    data = load_digits("rot90")
    runs = []
    for _ in range(2):
        model = load_base_model()
        runs.append(train(model, data, steps=30, seed=3))
    assert runs[0] == runs[1]
    assert sum(runs[0][-5:]) < sum(runs[0][:5])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: load_digits("rot45"), f"task must be one of {TASKS}"),
        (lambda: load_digits("rot90", test_fraction=1.5), "test_fraction must be between 0 and 1"),
        (
            lambda: train(load_base_model().requires_grad_(False), load_digits()),
            "no trainable parameters",
        ),
    ],
)
def test_bad_input(call, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_split_validation_holds_out_training_images_only() -> None:
    data = load_digits("rot90")
    fit, tune = split_validation(data, 0.2)
    n_val = int(len(data.x_train) * 0.2)
    assert len(tune.x_test) == n_val and len(fit.x_train) == len(data.x_train) - n_val
    assert torch.equal(fit.x_train, tune.x_train) and torch.equal(fit.x_test, data.x_test)
    assert torch.equal(tune.x_test, data.x_train[:n_val])  # held out: not in fit.x_train
    assert torch.equal(fit.x_train, data.x_train[n_val:])
    with pytest.raises(ValueError, match="fraction"):
        split_validation(data, 1.0)
