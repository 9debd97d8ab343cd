"""`hybrid generate` on two plain images, offline, with any checkpoint; every user mistake is one
line naming the file or option and the fix, never a traceback."""

import numpy as np
import pytest
from PIL import Image

from hybrid.cli import main
from tests.test_generate import S, save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    return tmp_path / "a.png", tmp_path / "b.png"


def generate(tmp_path, ckpt, images, *extra) -> list[str]:
    return ["generate", "--checkpoint", str(ckpt), "--reference", str(images[0]), "--target", str(images[1]),
            "--out", str(tmp_path / "out"), "--device", "cpu", *extra]


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if " WARNING " not in line]  # log warnings may come first
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("hybrid generate: error: "), err
    return lines[0]


def test_a_checkpoint_trained_on_depth_files_runs_offline_on_two_plain_images(tmp_path, images, capsys, model_dir):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", data={"resolution": S, "edge_model": "canny",
                                                         "depth_source": "dataset"})
    err = one_line_error(capsys, generate(tmp_path, ckpt, images))
    for option in ("--reference-depth and --target-depth", "--depth-source depth_anything_small",
                   "--depth-source flat"):
        assert option in err
    err = one_line_error(capsys, generate(tmp_path, ckpt, images, "--depth-source", "depth_anything_small"))
    assert "not here (offline)" in err and "--depth-source flat" in err
    assert main(generate(tmp_path, ckpt, images, "--depth-source", "flat")) == 0  # only when asked for
    assert (tmp_path / "out" / "AHD.png").exists() and (tmp_path / "out" / "target_depth.png").exists()


def test_user_mistakes_are_one_line_with_the_fix(tmp_path, images, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", data={"resolution": S, "edge_model": "canny",
                                                         "depth_source": "dataset"})
    flat = ("--depth-source", "flat")
    assert "is not a checkpoint directory" in one_line_error(capsys, generate(tmp_path, tmp_path / "nope", images))
    assert "is not valid JSON" in one_line_error(capsys, generate(tmp_path, ckpt, images, *flat, "--manipulate",
                                                                  "{area: 0.1"))
    (tmp_path / "out").write_text("a file")
    assert "is a file; give a folder" in one_line_error(capsys, generate(tmp_path, ckpt, images, *flat))
    (tmp_path / "out").unlink()
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 10)
    err = one_line_error(capsys, generate(tmp_path, ckpt, images, *flat))
    assert "model.safetensors cannot be loaded" in err and "published" in err
    (ckpt / "model.safetensors").unlink()
    assert "has no model.safetensors" in one_line_error(capsys, generate(tmp_path, ckpt, images, *flat))
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt2", data={"resolution": S, "edge_model": "canny",
                                                          "depth_source": "dataset"})
    err = one_line_error(capsys, generate(tmp_path, ckpt, (tmp_path / "x.png", images[1]), *flat))
    assert str(tmp_path / "x.png") in err


def test_scoring_mistakes_are_one_line_naming_the_file_and_line(tmp_path, capsys):
    ref = tmp_path / "ref.csv"
    ref.write_text("filename,hybrid_stat,ssp_indicator\na.JPG,0,major\nb.JPG,1,mimic\n")
    pred = tmp_path / "pred.txt"

    def score_error() -> str:
        assert main(["score", "--predictions", str(pred), "--reference", str(ref)]) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        return err

    assert "pred.txt" in score_error()  # missing file
    pred.write_text("filename,score\na.JPG,0.1\nb.JPG,0.9\n")
    assert "line 1" in score_error()  # a header line
    pred.write_text("a.JPG,nan\nb.JPG,0.9\n")
    assert "not finite" in score_error()
    pred.write_text("a.JPG,0.1\n")
    assert "b.JPG" in score_error()  # a reference row without a prediction
