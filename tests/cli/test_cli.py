"""The command line end to end on a tiny checkpoint: convert, info, extract (and resume), generate."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jtrust
from jtrust.cli import main


def test_convert_info_extract_generate(tiny_checkpoints, tmp_path, capsys):
    src = tiny_checkpoints["llama"][0]
    main(["convert", str(src), str(tmp_path / "ckpt")])
    main(["info", "--model", str(tmp_path / "ckpt")])
    assert '"n_layers": 3' in capsys.readouterr().out

    texts = tmp_path / "texts.csv"
    texts.write_text("text,label\n\"Trust, but verify.\",1\nThe quick brown fox.,0\nWhat is France?,1\n")
    out = tmp_path / "acts"
    main(["extract", "--model", str(tmp_path / "ckpt"), "--data", str(texts), "--out", str(out),
          "--layers", "0,2", "--batch-size", "2"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["layers"] == [0, 2] and manifest["n_texts"] == 3
    # the stored activations are the library's, for the same model and texts
    model = jtrust.load(tmp_path / "ckpt")
    expected = jtrust.extract(model, ["Trust, but verify.", "The quick brown fox.", "What is France?"],
                              layers=[0, 2], progress=False)
    np.testing.assert_allclose(jtrust.load_activations(out).get("resid_post", 2),
                               expected.get("resid_post", 2), atol=1e-6)

    main(["generate", "--model", str(src), "--prompt", "Trust", "--prompt", "The quick",
          "--max-new-tokens", "5"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    greedy = jtrust.generate(model, ["Trust", "The quick"], max_new_tokens=5)
    assert [line["output"] for line in lines] == [t[0] for t in greedy.texts]


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    for argv, message in ((["info", "--model", str(tmp_path / "missing")], "jtrust info: no checkpoint at"),
                          (["extract", "--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")],
                           "jtrust extract: no dataset at")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err
