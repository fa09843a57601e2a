"""Every YAML loads through llm-foundry's config validation (unknown keys fail), and our parts build from it."""

import inspect
import json
import tempfile
from pathlib import Path

import pytest
import torch
from llmfoundry.command_utils.train import validate_config
from llmfoundry.registry import dataloaders
from llmfoundry.utils.builders import build_algorithm, build_callback
from llmfoundry.utils.config_utils import TRAIN_CONFIG_KEYS, TrainConfig, make_dataclass_and_log_config
from omegaconf import OmegaConf

ROOT = Path(__file__).parent.parent
YAMLS = sorted(p for p in [*(ROOT / 'yamls').rglob('*.yaml'), *(ROOT / 'composer_shear' / 'yamls').rglob('*.yaml')]
               if p.parent.name != 'eval')  # training YAMLs (yamls/eval/ holds ICL task lists: tests/test_icl.py)


def load(path, **overrides):
    cfg = OmegaConf.load(path)
    for key in cfg.get('variables', {}):
        if OmegaConf.is_missing(cfg.variables, key):
            cfg.variables[key] = f'/placeholder/{key}'
    if cfg.get('variables', {}).get('reference_loss', '').startswith('/placeholder'):  # must be a real file
        path = Path(tempfile.mkdtemp()) / 'reference.json'
        path.write_text(json.dumps({d: 3.0 for d in cfg.variables.domains}))
        cfg.variables.reference_loss = str(path)
    if cfg.get('variables', {}).get('pruning_run', '').startswith('/placeholder'):  # a finished pruning stage
        run = Path(tempfile.mkdtemp())
        domains = list(cfg.variables.domains)
        (run / 'dynamic_loading.json').write_text(json.dumps({
            'domains': domains, 'initial': list(cfg.variables.proportions), 'history': [],
            'loader': {'seed': 17, 'sizes': [10] * len(domains), 'epoch': 2,
                       'cursor': {'passes': [0] * len(domains), 'offsets': [3] * len(domains)}}}))
        cfg.variables.pruning_run = str(run)
    if cfg.get('variables', {}).get('teacher', '').startswith('/placeholder'):  # the teacher must be an HF folder
        from composer_shear.testing import save_tiny
        cfg.variables.teacher = str(save_tiny(Path(tempfile.mkdtemp()) / 'teacher'))
    for key in [k for k in cfg if OmegaConf.is_missing(cfg, k)]:
        cfg[key] = f'/placeholder/{key}'
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return make_dataclass_and_log_config(cfg, TrainConfig, TRAIN_CONFIG_KEYS, transforms='all')[1]


def test_the_paper_yamls_are_there_and_load_the_model_once():
    """The paper's YAMLs (GPU, FSDP) start the model with `init_device: mixed`: rank 0 reads the weights, the
    others start on the meta device and receive their shards (tests/test_distributed.py runs it on 2 ranks)."""
    paper = [p for p in YAMLS if p.parent.name == 'yamls' and p.name.startswith(('prune_', 'continue'))]
    assert {'prune_1.3b.yaml', 'prune_2.7b.yaml', 'continue_1.3b.yaml', 'continue_2.7b.yaml',
            'continue_kd_1.3b.yaml', 'continue_kd_2.7b.yaml'} <= {p.name for p in paper}
    for path in paper:
        assert OmegaConf.load(path).model.init_device == 'mixed', path.name


@pytest.mark.parametrize('path', YAMLS, ids=lambda p: p.name)
def test_yaml_validates_and_builds(path):
    cfg = load(path)
    validate_config(cfg)
    for name, kwargs in (cfg.algorithms or {}).items():
        build_algorithm(name, kwargs)
    for name, kwargs in (cfg.callbacks or {}).items():
        build_callback(name=name, kwargs=kwargs)
    if 'dynamic_loading' in (cfg.callbacks or {}):
        dyn = cfg.callbacks['dynamic_loading']
        assert dyn['domains'] == cfg.train_loader['dataset']['domains']
        assert [e['label'] for e in cfg.eval_loaders] == dyn['domains']
        assert dyn['initial_proportions'] == cfg.train_loader['dataset']['proportions']
        interval = cfg.train_loader['dataset']['epoch_size'] // cfg.global_train_batch_size
        assert interval == OmegaConf.load(path).variables.interval_batches


@pytest.mark.parametrize('path', YAMLS, ids=lambda p: p.name)
def test_loaders_have_the_arguments_their_builders_need(path):
    """llm-foundry's config check does not look inside loaders: bind each to its registered builder."""
    cfg = load(path)
    evals = cfg.eval_loaders or ([cfg.eval_loader] if cfg.eval_loader else [])
    for loader in [cfg.train_loader, *evals]:
        kwargs = {k: v for k, v in loader.items() if k not in ('name', 'label')}
        inspect.signature(dataloaders.get(loader['name'])).bind(tokenizer=None, device_batch_size=1, **kwargs)
        if kwargs.get('num_workers') == 0:  # torch.utils.data.DataLoader's rule
            assert kwargs.get('prefetch_factor', 2) is None and not kwargs.get('persistent_workers', True)


@pytest.mark.parametrize('size', ['1.3b', '2.7b'])
def test_the_oneshot_recipe_is_the_paper_stage_2_with_distillation_from_the_rp_mix(size):
    """continue_kd_<size>.yaml (after `composer-shear prune`) differs from continue_<size>.yaml only by the
    distillation from the source and the initial mix, so the two cannot drift apart."""
    kd = OmegaConf.to_container(OmegaConf.load(ROOT / 'yamls' / f'continue_kd_{size}.yaml'))
    paper = OmegaConf.to_container(OmegaConf.load(ROOT / 'yamls' / f'continue_{size}.yaml'))
    assert kd['algorithms'].pop('shear_distill') == {'teacher': '${variables.teacher}', 'alpha': 1.0,
                                                     'temperature': 1.0, 'kd_type': 'forward_kl',
                                                     'teacher_precision': 'bf16'}
    assert kd['variables'].pop('teacher') == '???'
    rp = [0.67, 0.045, 0.045, 0.02, 0.045, 0.025, 0.15]  # cc, github, book, stackexchange, wiki, arxiv, c4-rp
    assert kd['callbacks']['dynamic_loading'].pop('initial_proportions') == rp
    assert kd['train_loader']['dataset'].pop('proportions') == rp
    paper['callbacks']['dynamic_loading'].pop('initial_proportions')
    paper['train_loader']['dataset'].pop('proportions')
    assert (kd.pop('run_name'), paper.pop('run_name')) == (f'continue-kd-{size}', f'continue-sheared-{size}')
    assert kd == paper


def test_unknown_top_level_key_fails():
    with pytest.raises(ValueError, match='pruning_target'):
        load(YAMLS[0], pruning_target=3)


@pytest.mark.parametrize('name', ['prune_1.3b', 'prune_2.7b', 'continue_1.3b', 'continue_2.7b'])
def test_the_commented_shear_distill_block_works_uncommented(name, tmp_path):
    """Each paper YAML carries a commented `shear_distill` block; uncommented (the teacher pointed at a real
    folder) it validates and builds."""
    from composer_shear.distill import ShearDistill
    from composer_shear.testing import save_tiny
    lines = (ROOT / 'yamls' / f'{name}.yaml').read_text().splitlines()
    start = lines.index('  # shear_distill:')
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith('  #   '):
            break
        block.append(line)
    text = '\n'.join(line.replace('# ', '', 1) for line in block)
    teacher = save_tiny(tmp_path / 'teacher')
    kwargs = OmegaConf.to_container(OmegaConf.create(text))['shear_distill']
    assert kwargs['alpha'] == 1.0 and kwargs['kd_type'] == 'forward_kl'
    assert ('teacher' in kwargs) == name.startswith('continue')  # continued pre-training must name the source
    kwargs['teacher'] = str(teacher)
    cfg = load(ROOT / 'yamls' / f'{name}.yaml', **{'algorithms.shear_distill': kwargs})
    validate_config(cfg)
    assert isinstance(build_algorithm('shear_distill', cfg.algorithms['shear_distill']), ShearDistill)


@pytest.mark.parametrize('path', [p for p in YAMLS if 'fsdp_config' in OmegaConf.load(p)], ids=lambda p: p.name)
def test_fsdp_mixed_precision_keeps_the_rotary_buffers_fp32(path):
    """Resolved as Composer resolves it for FSDP1, the YAML's mixed precision casts no buffer (RoPE's inv_freq)."""
    from composer_shear.precision import buffer_dtype, rounded_buffers
    from composer_shear.testing import llama_config, tiny_model
    cfg = load(path)
    dtype = buffer_dtype(cfg.precision, cfg.fsdp_config['mixed_precision'])
    assert dtype in (None, torch.float32)
    model = tiny_model(llama_config())
    assert rounded_buffers(model, dtype) == []
    assert 'model.rotary_emb.inv_freq' in rounded_buffers(model, buffer_dtype(cfg.precision, 'DEFAULT'))


def test_a_run_that_would_round_buffers_is_warned_once_naming_the_key(caplog):
    from types import SimpleNamespace

    from composer_shear import precision
    from composer_shear.testing import llama_config, tiny_model
    model = tiny_model(llama_config())

    def state(mixed, version=1, run_precision='amp_bf16'):
        return SimpleNamespace(fsdp_config=SimpleNamespace(mixed_precision=mixed), fsdp_config_version=version,
                               precision=run_precision, model=model)

    precision._warned.clear()
    with caplog.at_level('WARNING', logger='composer_shear.precision'):
        assert precision.warn_if_buffers_rounded(state('DEFAULT'))
        assert precision.warn_if_buffers_rounded(state('DEFAULT'))  # still true, said once
        assert not precision.warn_if_buffers_rounded(state(dict(precision.KEEP_BUFFERS_FP32)))
        assert not precision.warn_if_buffers_rounded(state('DEFAULT', version=2))  # FSDP2 casts no buffer
        assert not precision.warn_if_buffers_rounded(state('FULL'))
        assert not precision.warn_if_buffers_rounded(SimpleNamespace(fsdp_config=None, model=model))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert 'fsdp_config.mixed_precision' in lines[0] and 'buffer_dtype: fp32' in lines[0]
    assert 'model.rotary_emb.inv_freq' in lines[0]
