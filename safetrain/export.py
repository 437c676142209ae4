"""`mode=export`: a trained model as files that run without safetrain. The ONNX model and the `torch.export`
program take uint8 images (N, C, H, W) and return logits, with the training normalization inside [M02]; the weights
as safetensors; model.json says what goes in and out. Success is reported only after both exported forms agree with
the PyTorch model on real images of the run's test split (numbers in model.json)."""
from __future__ import annotations

import importlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from safetrain import __version__, data as D
from safetrain.config import AfterTrainingConfig
from safetrain.errors import ConfigError, SafetrainError
from safetrain.inference import Trained, load_trained, run_splits
from safetrain.io import UMASK, write_json

log = logging.getLogger("safetrain")
NEEDS = ("onnx", "onnxscript", "onnxruntime", "safetensors")  # the `export` extra
MAX_ABS_DIFF = 1e-3  # logits of the exported forms vs PyTorch on the same uint8 images (float32 everywhere)


def export(cfg: AfterTrainingConfig) -> Path:
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"[config] mode=export needs {', '.join(missing)}: pip install \"safetrain[export]\".")
    trained = load_trained(cfg.predict.checkpoint, "cpu")
    out = Path(cfg.predict.output).expanduser() if cfg.predict.output else trained.run_dir / "export"
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"[config] {out} already holds files; export into a new folder (predict.output=DIR).")
    images, source = parity_images(trained)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    tmp.chmod(0o777 & ~UMASK)  # a folder to ship: as mkdir would make it
    try:  # written beside, then renamed: the folder appears whole, or not at all
        write_model_files(trained, images[:2], tmp)
        parity, agree = check_parity(trained, images, tmp), agreement(trained)
        write_json(tmp / "model.json", sidecar(trained, {**parity, "images": source}))
        for f in tmp.iterdir():
            f.chmod(0o666 & ~UMASK)  # files to ship: readable as any file the user creates
        if out.exists():
            out.rmdir()  # the empty folder given as predict.output
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s -> %s (model.onnx, model.pt2, model.safetensors, model.json); on %s: max |logit "
             "difference| ONNX Runtime %.2e, torch.export %.2e, %s %.4f / %.4f", trained.path, out,
             source, parity["onnx_max_abs_diff"], parity["torch_export_max_abs_diff"], agree.replace("_", " "),
             parity[f"onnx_{agree}"], parity[f"torch_export_{agree}"])
    return out


def write_model_files(trained: Trained, example: torch.Tensor, folder: Path) -> None:
    from safetensors.torch import save_file

    batch = torch.export.Dim("batch", min=1, max=65536)
    trained.model.to(memory_format=torch.contiguous_format)  # exported weights in the plain layout
    program = torch.export.export(trained.model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, folder / "model.pt2")
    for name in ("onnxscript", "onnx_ir"):  # their optimizer passes log every step at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.onnx.export(trained.model, (example,), str(folder / "model.onnx"), dynamo=True, dynamic_shapes=({0: batch},),
                      input_names=["images"], output_names=["logits"], external_data=False, verbose=False)
    save_file({k: v.contiguous() for k, v in trained.ckpt["model"].items()}, str(folder / "model.safetensors"))


def agreement(trained: Trained) -> str:
    """What the parity check compares besides the logits: the argmax, or (several labels per image) the label sets
    at the checkpoint's thresholds."""
    return "label_set_agreement" if trained.ckpt.get("thresholds") else "argmax_agreement"


@torch.no_grad()
def check_parity(trained: Trained, images: torch.Tensor, folder: Path) -> dict:
    """Logits of ONNX Runtime and of the reloaded torch.export program vs the PyTorch model on `images`."""
    import onnxruntime as ort

    ref = trained.model(images)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    outputs = {"onnx": torch.from_numpy(session.run(None, {"images": images.numpy()})[0]),
               "torch_export": torch.export.load(folder / "model.pt2").module()(images)}
    parity = {"n_images": len(images)}
    thresholds, agree = trained.ckpt.get("thresholds"), agreement(trained)

    def decided(logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid() >= torch.tensor(thresholds) if thresholds else logits.argmax(1)[:, None]
    for name, y in outputs.items():
        parity[f"{name}_max_abs_diff"] = float((y - ref).abs().max())
        parity[f"{name}_{agree}"] = float((decided(y) == decided(ref)).all(1).float().mean())
        if thresholds:
            parity[f"{name}_max_abs_sigmoid_diff"] = float((y.sigmoid() - ref.sigmoid()).abs().max())
        if parity[f"{name}_max_abs_diff"] > MAX_ABS_DIFF or parity[f"{name}_{agree}"] < 1:
            raise SafetrainError(f"[export] the {name} model does not match PyTorch on {len(images)} images (max "
                                 f"|logit difference| {parity[f'{name}_max_abs_diff']:.2e}, "
                                 f"{agree.replace('_', ' ')} {parity[f'{name}_{agree}']:.4f}); nothing was written. "
                                 "Report this with the torch and onnxruntime versions.")
    return parity


def parity_images(trained: Trained, n: int = 256) -> tuple[torch.Tensor, str]:
    """Up to `n` uint8 images of the run's test split, rebuilt as training split it (same seed, same code, the
    caches); random images only when that data cannot be reached any more, and then said."""
    try:
        src, splits = run_splits(trained)
        test = splits["test"].subset(torch.arange(min(n, len(splits["test"]))))
        x = next(D.uint8_batches(test, src.decoding(num_workers=0), batch_size=n))
        return x, f"{len(x)} images of the run's test split"
    except (SafetrainError, OSError, RuntimeError) as e:
        f = trained.facts
        log.warning("export: the run's data cannot be read (%s); parity is checked on random images", e)
        g = torch.Generator().manual_seed(0)
        return (torch.randint(0, 256, (64, f["channels"], f["height"], f["width"]), dtype=torch.uint8, generator=g),
                f"64 random images (the run's test split could not be read: {str(e)[:120]})")


def output_contract(trained: Trained) -> dict:
    """What the exported model's output means: softmax over classes, or (several labels per image) a sigmoid per
    label and the thresholds chosen on validation that make a label set of it [M39]."""
    classes, thresholds = trained.facts["classes"], trained.ckpt.get("thresholds")
    out = {"name": "logits", "shape": ["N", len(classes)]}
    if not thresholds:
        return {**out, "probabilities": "softmax over axis 1"}
    return {**out, "probabilities": "sigmoid of each logit: each label present or absent on its own",
            "thresholds": dict(zip(classes, thresholds)),
            "label_set": "the labels whose probability reaches their threshold (chosen on the validation split)"}


def sidecar(trained: Trained, parity: dict) -> dict:
    f, run = trained.facts, trained.run_dir / "metrics.json"
    final = json.loads(run.read_text()) if run.exists() else {}
    return {
        "classes": f["classes"],
        "input": {"name": "images", "dtype": "uint8", "layout": "NCHW", "shape": ["N", f["channels"], f["height"],
                                                                                   f["width"]],
                  "channels": "grayscale" if f["channels"] == 1 else "RGB", "range": "0-255, not normalized",
                  "resize": f"to {f['height']}x{f['width']} (bilinear, data.resize="
                            f"{(trained.ckpt.get('data_spec') or {}).get('resize', 'squash')}) as training did"},
        "output": output_contract(trained),
        "normalization": {"mean": f["mean"], "std": f["std"], "inside_the_model": True,
                          "formula": "(x / 255 - mean) / std per channel, from the training split"},
        "training_metrics": {k: final[k] for k in ("test_acc", "test_balanced_acc", "test_map", "test_macro_f1",
                                                   "test_micro_f1", "best_val", "selection_metric", "best_epoch")
                             if k in final},
        "checkpoint_epoch": trained.ckpt["epoch"],
        "safetrain_version": __version__,  # also where safetrain runs from a clone (not installed)
        "torch_version": torch.__version__,
        "source_run": str(trained.run_dir.resolve()), "source_checkpoint": str(trained.path.resolve()),
        "parity": parity,
        "files": {"model.onnx": "ONNX (opset of torch.onnx's dynamo exporter)", "model.pt2": "torch.export program "
                  "(torch.export.load(...).module())", "model.safetensors": "the network's weights without the "
                  "normalization (safetrain's model state_dict)"},
    }
