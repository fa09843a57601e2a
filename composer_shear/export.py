"""Export: a masked Composer checkpoint (whole or sharded) -> a plain, smaller Hugging Face model folder."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from composer_shear.algorithm import MASKS_ATTR
from composer_shear.llama import prune_state_dict, weights_to_prune
from composer_shear.masks import MaskSnapshot, ShearMasks, target_buffer, target_from_buffer
from composer_shear.report import dumps, report_table, shape_report
from composer_shear.shapes import ModelShape, ShapeError

log = logging.getLogger(__name__)

MASKS_FILE = 'masks.safetensors'
HF_PREFIX = 'model.'  # the HF model's attribute on llm-foundry's / composer's HuggingFaceModel


class ExportError(RuntimeError):
    pass


# writing folders and files atomically ------------------------------------------------------------------

@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `out`; rename it to `out` only if the block succeeds."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f'{out} already exists (pass --overwrite to replace it)')
    if out.exists() and any(out.iterdir()) and not (out / 'shape_report.json').exists():
        raise ExportError(f'{out} is not empty and is not a composer-shear output: refusing to replace it')
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f'.{out.name}.old-{os.getpid()}')
            out.rename(old)
            try:
                tmp.rename(out)
            except OSError:
                old.rename(out)
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_masks(path: str | os.PathLike, snap: MaskSnapshot):
    """masks.safetensors: log alpha, multipliers and the exact-target deterministic masks, with the source and
    target shapes as metadata."""
    tensors = {f'log_alpha.{k}': v for k, v in snap.log_alpha.items()}
    tensors |= {f'z.{k}': v for k, v in snap.z.items()}
    tensors['lambdas'] = snap.lambdas
    tensors['target_shape'] = target_buffer(snap.target)
    meta = {'format': 'pt', 'source': json.dumps(snap.source.to_dict()), 'target': json.dumps(snap.target.to_dict())}
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def masks_from_state(source: ModelShape, mask_sd: dict) -> ShearMasks:
    """Rebuild the mask module from its state dict (keys relative to the module)."""
    names = sorted(k.split('.', 1)[1] for k in mask_sd if k.startswith('log_alpha.'))
    if 'target_shape' not in mask_sd or not names:
        raise ExportError('no shear_pruning masks found (expected log_alpha.* and target_shape)')
    modules = {'layer': 'layer', 'hidden': 'hidden', 'kv': 'head', 'query': 'head',
               'intermediate': 'intermediate'}
    target = target_from_buffer(source, mask_sd['target_shape'])
    masks = ShearMasks(source, target, {modules[n] for n in names})
    masks.load_state_dict(mask_sd, strict=True)
    return masks


def load_masks_file(path: str | os.PathLike) -> ShearMasks:
    from safetensors import safe_open
    with safe_open(str(path), 'pt') as f:
        meta = f.metadata() or {}
    if 'source' not in meta:
        raise ExportError(f'{path} has no source shape metadata; was it written by composer-shear?')
    source = ModelShape(**json.loads(meta['source']))
    tensors = load_file(str(path))
    return masks_from_state(source, {k: v for k, v in tensors.items() if k.startswith(('log_alpha.', 'lambdas',
                                                                                          'target_shape'))})


# reading Composer checkpoints --------------------------------------------------------------------------

def read_checkpoint(path: str | os.PathLike, mmap: bool = True) -> tuple[dict, dict]:
    """The model state dict and the HF integration metadata ({} if absent) of a Composer checkpoint:
    a whole `.pt` file or a sharded (torch.distributed.checkpoint) folder. A whole file is memory-mapped by
    default, so the optimizer state it also holds is never read into memory."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f'checkpoint {path} does not exist')
    if path.is_dir():
        return _read_sharded(path)
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


def _set_nested(d, keys, value):
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

def pruned_config(config, shape: ModelShape, dtype: torch.dtype):
    """A config of the source's class with the pruned shape (head_dim written explicitly)."""
    from transformers import AutoConfig
    d = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
    for key, value in shape.target_dict().items():
        d[key] = value
    d['head_dim'] = shape.head_dim
    d['torch_dtype'] = str(dtype).removeprefix('torch.')
    d.pop('_name_or_path', None)
    d.pop('quantization_config', None)
    model_type = d.pop('model_type')
    return AutoConfig.for_model(model_type, **d)


def check_keys(sd: dict, config) -> None:
    """Strict check: exactly the keys and shapes the target architecture expects."""
    from transformers import AutoModelForCausalLM
    # import the modeling module first: a first import under the meta device breaks torch._dynamo's own import
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    with torch.device('meta'):
        ref = model_class(config)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop('lm_head.weight', None)
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unexpected:
        raise ExportError(f'pruned weights do not match the target architecture: missing {missing[:5]}, '
                          f'unexpected {unexpected[:5]}')
    bad = [(k, got[k], expected[k]) for k in expected if got[k] != expected[k]]
    if bad:
        raise ExportError(f'pruned weight shapes differ from the target architecture: {bad[:5]}')


def export_pruned(hf_sd: dict, mask_sd: dict, config, out: str | os.PathLike, tokenizer=None,
                  dtype: torch.dtype | None = None, overwrite: bool = False, generation_config=None) -> dict:
    """Fold the exact-target deterministic masks into the HF weights and write a smaller HF model folder.
    Returns the shape report."""
    source = ModelShape.from_config(config)
    masks = masks_from_state(source, mask_sd)
    with torch.no_grad():
        snap = masks.snapshot()
    z = snap.z
    hf_sd = weights_to_prune(hf_sd, source)
    pruned, shape = prune_state_dict(hf_sd, source, z)
    if shape != masks.target:
        raise ExportError(f'pruned shape {shape.target_dict()} differs from the target {masks.target.target_dict()}')
    dtype = dtype or hf_sd['model.embed_tokens.weight'].dtype
    pruned = {k: v.to(dtype).contiguous() for k, v in pruned.items()}
    new_config = pruned_config(config, shape, dtype)
    check_keys(pruned, new_config)
    report = shape_report(snap)
    report['exported'] = shape.target_dict() | {'num_params': shape.num_params(), 'dtype': str(dtype)}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        new_config.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        _save_weights(pruned, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_masks(tmp / MASKS_FILE, snap)
        (tmp / 'shape_report.json').write_text(dumps(report))
        (tmp / 'shape_report.md').write_text(report_table(report))
    return report


def _save_weights(sd: dict, folder: Path, max_shard_bytes: int = 5 * 1024**3):
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
                      dtype: torch.dtype | None = None, overwrite: bool = False, mmap: bool = True) -> dict:
    """`composer-shear export`: checkpoint -> HF folder. The config and tokenizer come from `source` (an HF
    folder) when given, else from the HF metadata Composer stores in the checkpoint."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    if source is not None and not Path(source, 'config.json').exists():
        raise ExportError(f'--source {source} is not a Hugging Face model folder (no config.json)')
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
    return export_pruned(hf_sd, mask_sd, config, out, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite,
                         generation_config=generation)


def load_any_masks(path: str | os.PathLike, source: str | None = None) -> ShearMasks:
    """Masks from a masks.safetensors file, an exported folder, or a Composer checkpoint."""
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


__all__ = ['export_checkpoint', 'export_pruned', 'read_checkpoint', 'load_any_masks', 'save_masks', 'ExportError',
           'ShapeError']
