"""Export: a masked Composer checkpoint (whole or sharded) -> a plain, smaller Hugging Face model folder."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from composer_shear._io import REPORT_FILE, atomic_dir, atomic_file
from composer_shear._remote import is_remote, local_copy
from composer_shear.checks import check_export_args, check_inspect_args
from composer_shear.errors import ExportError
from composer_shear.masks import MASKS_ATTR, MaskSnapshot, ShearMasks, target_buffer, target_from_buffer
from composer_shear.report import dumps, report_table, shape_report
from composer_shear.shapes import STRUCTURE_MODULES, ModelShape
from composer_shear.surgery import prune_to_target

log = logging.getLogger(__name__)

__all__ = ['ExportError', 'export_checkpoint', 'export_pruned', 'load_any_masks', 'read_checkpoint', 'save_masks',
           'write_mask_report']

MASKS_FILE = 'masks.safetensors'
HF_PREFIX = 'model.'  # the HF model's attribute on llm-foundry's / composer's HuggingFaceModel


def save_masks(path: str | os.PathLike, snap: MaskSnapshot) -> None:
    """masks.safetensors: log alpha, multipliers and the exact-target deterministic masks, with the source and
    target shapes as metadata."""
    tensors = {f'log_alpha.{k}': v for k, v in snap.log_alpha.items()}
    tensors |= {f'z.{k}': v for k, v in snap.z.items()}
    tensors['lambdas'] = snap.lambdas
    tensors['target_shape'] = target_buffer(snap.target)
    tensors['binary_values'] = torch.tensor(int(snap.binary))
    meta = {'format': 'pt', 'source': json.dumps(snap.source.to_dict()), 'target': json.dumps(snap.target.to_dict())}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def masks_from_state(source: ModelShape, mask_sd: dict) -> ShearMasks:
    """Rebuild the mask module from its state dict (keys relative to the module)."""
    names = sorted(k.split('.', 1)[1] for k in mask_sd if k.startswith('log_alpha.'))
    if 'target_shape' not in mask_sd or not names:
        raise ExportError('no shear_pruning masks found (expected log_alpha.* and target_shape)')
    unknown = sorted(set(names) - set(STRUCTURE_MODULES))
    if unknown:
        raise ExportError(f'unknown mask structures {unknown} (known: {list(STRUCTURE_MODULES)})')
    target = target_from_buffer(source, mask_sd['target_shape'])
    masks = ShearMasks(source, target, {STRUCTURE_MODULES[n] for n in names})
    kept, order = [s.name for s in masks.structures], [n for n in STRUCTURE_MODULES if n in names]
    if kept != order:  # a checkpoint from before full-target structures lost their mask: drop those
        mask_sd = {k: v for k, v in mask_sd.items() if not k.startswith('log_alpha.')
                   or k.split('.', 1)[1] in kept}
        mask_sd['lambdas'] = mask_sd['lambdas'][[order.index(n) for n in kept]]
    if 'binary_values' not in mask_sd:  # written before the choice existed: soft values, as then
        mask_sd = {**mask_sd, 'binary_values': torch.tensor(0)}
    masks.load_state_dict(mask_sd, strict=True)
    return masks


def load_masks_file(path: str | os.PathLike) -> ShearMasks:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), 'pt') as f:  # a truncated file fails here, by name
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ExportError(f'{path} is not a readable safetensors file ({e})') from e
    if 'source' not in meta:
        raise ExportError(f'{path} has no source shape metadata; was it written by composer-shear?')
    source = ModelShape(**json.loads(meta['source']))
    return masks_from_state(source, {k: v for k, v in tensors.items() if k.startswith(('log_alpha.', 'lambdas',
                                                                                          'target_shape',
                                                                                          'binary_values'))})


# reading Composer checkpoints --------------------------------------------------------------------------

def check_zip(path: Path) -> None:
    """The CRC-32 of every record of a zip-format checkpoint (torch.load does not check them, so flipped bytes
    would load as wrong tensors). Reads the whole file once."""
    import zipfile
    if not zipfile.is_zipfile(path):
        return  # legacy format, or too damaged to be a zip: torch.load names the problem
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ExportError(f'checkpoint {path} is corrupt ({e})') from e
    if bad is not None:
        raise ExportError(f'checkpoint {path} is corrupt: record {bad} fails its CRC-32 check')


def read_checkpoint(path: str | os.PathLike, mmap: bool = True) -> tuple[dict, dict]:
    """The model state dict and the HF integration metadata ({} if absent) of a Composer checkpoint:
    a whole `.pt` file or a sharded (torch.distributed.checkpoint) folder. A whole file is memory-mapped by
    default, so the optimizer state it also holds is never read into memory."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f'checkpoint {path} does not exist')
    if path.is_dir():
        return _read_sharded(path)
    check_zip(path)
    try:
        try:
            ckpt = torch.load(path, map_location='cpu', weights_only=False, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            ckpt = torch.load(path, map_location='cpu', weights_only=False)  # legacy (non-zip) format
    except Exception as e:
        raise ExportError(f'cannot read checkpoint {path}: {e}') from e
    if not isinstance(ckpt, dict) or 'state' not in ckpt or 'model' not in ckpt['state']:
        raise ExportError(f'{path} is not a Composer checkpoint (no state.model)')
    state = ckpt['state']
    return dict(state['model']), state.get('integrations', {}).get('huggingface', {})


def _read_sharded(path: Path) -> tuple[dict, dict]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    if not (path / '.metadata').exists():
        raise ExportError(f'{path} is a folder without a torch.distributed.checkpoint .metadata file')
    reader = dcp.FileSystemReader(str(path))
    meta = reader.read_metadata()
    prefix = 'state.model.'
    sd = {}
    for key, md in meta.state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(md, TensorStorageMetadata):
            sd[key] = torch.empty(md.size, dtype=md.properties.dtype)
    if not sd:
        raise ExportError(f'{path} holds no model weights under {prefix!r}')
    # The HF config is stored flattened ('...config.content.hidden_size'); the tokenizer's files are too, with
    # dots in file names and vocabularies that make them ambiguous, so a sharded export takes its tokenizer
    # from --source.
    wanted = {k for k in meta.state_dict_metadata if k.startswith('state.integrations.huggingface.model.config.')}
    loaded = {**sd, **{k: None for k in wanted}}
    dcp.load(loaded, storage_reader=reader, no_dist=True)
    model = {k[len(prefix):]: v for k, v in sd.items()}
    hf = {}
    for k in wanted:
        _set_nested(hf, k[len('state.integrations.huggingface.'):].split('.'), loaded[k])
    return model, hf


def _set_nested(d: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def split_model_state(model_sd: dict) -> tuple[dict, dict]:
    """(HF weights with HF key names, mask module state) from a ComposerModel state dict."""
    hf, masks = {}, {}
    for k, v in model_sd.items():
        k = k.removeprefix('module.')
        if k.startswith(MASKS_ATTR + '.'):
            masks[k[len(MASKS_ATTR) + 1:]] = v
        elif k.startswith(HF_PREFIX):
            hf[k[len(HF_PREFIX):]] = v
    if not masks:
        raise ExportError(f'the checkpoint has no {MASKS_ATTR}.* weights: it was not trained with shear_pruning')
    return hf, masks


# the export itself -------------------------------------------------------------------------------------

def export_pruned(hf_sd: dict, mask_sd: dict, config: Any, out: str | os.PathLike, tokenizer: Any = None,
                  dtype: torch.dtype | None = None, overwrite: bool = False, generation_config: Any = None,
                  moments: tuple[dict, dict, int] | None = None) -> dict:
    """Fold the exact-target deterministic masks into the HF weights and write a smaller HF model folder; with
    `moments` (`optim_state.read_adam_moments`), also the kept weights' Adam moments. Returns the shape report."""
    source = ModelShape.from_config(config)
    masks = masks_from_state(source, mask_sd)
    with torch.no_grad():
        snap = masks.snapshot()
    if moments is not None and not snap.binary:  # a folded value c would call for moments divided by c
        raise ExportError('export --optimizer-state needs binary mask values (shear_pruning.mask_values: binary); '
                          'this checkpoint was trained with soft values')
    pruned, new_config = prune_to_target(hf_sd, snap, config, dtype)
    shape, dtype = ModelShape.from_config(new_config), next(iter(pruned.values())).dtype
    report = shape_report(snap)
    report['exported'] = shape.target_dict() | {'num_params': shape.num_params(), 'dtype': str(dtype)}
    filled = {k: v for k, v in report['kept_given_up'].items() if v[0]}
    if filled:
        log.warning('export: the exact target was filled with structures the masks had given up on (log alpha at '
                    'or below -ln 100, keep probability 0.047 or less, ties broken by index): %s. The expected shape '
                    'was below the target when training stopped; these structures cost compute and carry near-zero '
                    'mask values (see shape_report.md)',
                    ', '.join(f'{k}: {n} of {m} kept' for k, (n, m) in filled.items()))
    with atomic_dir(out, overwrite=overwrite, marker=REPORT_FILE) as tmp:
        new_config.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        _save_weights(pruned, tmp)
        if moments is not None:
            from composer_shear.optim_state import prune_moments, save_moments
            first, second = prune_moments(moments[0], moments[1], hf_sd,
                                          lambda sd: prune_to_target(sd, snap, config, torch.float32)[0])
            save_moments(tmp, first, second, moments[2])
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_mask_report(tmp, snap, report)
    return report


def write_mask_report(folder: Path, snap: MaskSnapshot, report: dict) -> None:
    """masks.safetensors and the shape report (JSON and markdown) into `folder`."""
    save_masks(folder / MASKS_FILE, snap)
    (folder / REPORT_FILE).write_text(dumps(report))
    (folder / 'shape_report.md').write_text(report_table(report))


def _save_weights(sd: dict, folder: Path, max_shard_bytes: int = 5 * 1024**3) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    split = split_torch_state_dict_into_shards(sd, max_shard_size=max_shard_bytes)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: sd[k] for k in keys}, str(folder / filename), metadata={'format': 'pt'})
    if split.is_sharded:
        index = {'metadata': {'total_size': sum(v.numel() * v.element_size() for v in sd.values())},
                 'weight_map': split.tensor_to_filename}
        (folder / 'model.safetensors.index.json').write_text(json.dumps(index, indent=2))


def _hf_config_from_metadata(hf_meta: dict):
    cfg = hf_meta.get('model', {}).get('config', {}).get('content')
    if not cfg:
        return None
    if isinstance(cfg, str):
        cfg = json.loads(cfg)
    return dict(cfg)


def _tokenizer_from_metadata(hf_meta: dict):
    """Rebuild the tokenizer Composer stored in the checkpoint, if any."""
    if not hf_meta.get('tokenizer'):
        return None
    from composer.models import HuggingFaceModel
    with tempfile.TemporaryDirectory() as d:
        return HuggingFaceModel.load_huggingface_tokenizer_from_saved_state(hf_meta, tokenizer_save_dir=d)


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, source: str | None = None,
                      dtype: torch.dtype | None = None, overwrite: bool = False, mmap: bool = True,
                      optimizer_state: bool = False) -> dict:
    """`composer-shear export`: checkpoint -> HF folder. The config and tokenizer come from `source` (an HF
    folder) when given, else from the HF metadata Composer stores in the checkpoint. `optimizer_state`: also write
    the kept weights' Adam moments (`optimizer_state.safetensors`, a whole .pt checkpoint only). `checkpoint` may
    be an object-store URI (a whole checkpoint, a sharded checkpoint's prefix, or Composer's `latest-*.symlink`):
    it is downloaded to a temporary folder first."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    check_export_args(checkpoint, out, source, overwrite)  # before the checkpoint is read
    if is_remote(checkpoint):
        with local_copy(str(checkpoint)) as local:
            return export_checkpoint(local, out, source, dtype, overwrite, mmap, optimizer_state)
    model_sd, hf_meta = read_checkpoint(checkpoint, mmap=mmap)
    hf_sd, mask_sd = split_model_state(model_sd)
    tokenizer = generation = None
    if source is not None:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        with contextlib.suppress(OSError):
            generation = GenerationConfig.from_pretrained(source)
    else:
        config = _hf_config_from_metadata(hf_meta)
        if config is None:
            raise ExportError(f'{checkpoint} carries no Hugging Face config: pass --source HF_DIR')
        tokenizer = _tokenizer_from_metadata(hf_meta)
        if tokenizer is None:
            log.warning('the checkpoint carries no tokenizer: the export has none (pass --source HF_DIR to add it)')
    moments = None
    if optimizer_state:
        from composer_shear.optim_state import read_adam_moments
        moments = read_adam_moments(checkpoint, HF_PREFIX)
    return export_pruned(hf_sd, mask_sd, config, out, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite,
                         generation_config=generation, moments=moments)


def load_any_masks(path: str | os.PathLike, source: str | None = None) -> ShearMasks:
    """Masks from a masks.safetensors file, an exported folder, or a Composer checkpoint."""
    check_inspect_args(path, source)
    path = Path(path)
    if path.is_dir() and (path / MASKS_FILE).exists():
        path = path / MASKS_FILE
    if path.suffix == '.safetensors':
        return load_masks_file(path)
    model_sd, hf_meta = read_checkpoint(path)
    _, mask_sd = split_model_state(model_sd)
    if source is not None:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(source)
    else:
        config = _hf_config_from_metadata(hf_meta)
        if config is None:
            raise ExportError(f'{path} carries no Hugging Face config: pass --source HF_DIR')
    return masks_from_state(ModelShape.from_config(config), mask_sd)
