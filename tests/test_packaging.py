"""A non-editable install (a built wheel, installed into its own folder) runs the CLI and loads the demo's YAMLs
from package data, away from the source checkout."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def run(cmd, cwd, env):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('wheel')
    # build from a copy so that the build's own folders never land in the checkout
    src = tmp / 'src'
    files = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True)
    if files.returncode != 0:
        pytest.skip('not a git checkout')
    for rel in files.stdout.splitlines():
        if rel.startswith(('composer_shear/', 'pyproject.toml', 'README.md', 'LICENSE')):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes((ROOT / rel).read_bytes())
    run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation', '--wheel-dir',
         str(tmp / 'dist'), str(src)], cwd=tmp, env=os.environ)
    wheel = next((tmp / 'dist').glob('composer_shear-*.whl'))
    target = tmp / 'site'
    run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target', str(target), str(wheel)],
        cwd=tmp, env=os.environ)
    env = dict(os.environ, PYTHONPATH=str(target))
    return wheel, target, env, tmp


def test_wheel_ships_the_package_data(installed):
    wheel, *_ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ('composer_shear/py.typed', 'composer_shear/yamls/demo/prune.yaml',
                 'composer_shear/yamls/demo/continue.yaml', 'composer_shear/functional.py'):
        assert name in names, name
    assert not any(n.startswith(('tests/', 'bench/', 'data/')) for n in names)


def test_installed_package_runs_the_cli_and_loads_the_demo_yamls(installed):
    _, target, env, tmp = installed
    code = ('import composer_shear, composer_shear.demo as d; from omegaconf import OmegaConf; '
            'print(composer_shear.__file__); '
            'c = {s: OmegaConf.load(d.yaml_path(s)) for s in ("prune", "continue")}; '
            'print(c["prune"].max_duration, c["continue"].max_duration, list(c["prune"].variables.domains))')
    out = run([sys.executable, '-c', code], cwd=tmp, env=env).splitlines()
    assert out[0].startswith(str(target)), out  # the installed copy, not the checkout
    assert out[1] == "80ba 60ba ['code', 'reference', 'licenses']"
    cli = target / 'bin' / 'composer-shear'
    assert 'assets' in run([str(cli), '--help'], cwd=tmp, env=env)
    assert '--prune-steps' in run([str(cli), 'demo', '--help'], cwd=tmp, env=env)
    assert '--cache-dir' in run([str(cli), 'assets', '--help'], cwd=tmp, env=env)
