"""Object-store paths (`s3://bucket/prefix`, and any other scheme Composer's object stores support), read and
written through Composer's `ObjectStore`: the store a user's `save_folder` already uses, with its credentials
and `S3_ENDPOINT_URL`. Errors name the object and end in one line (`RemoteError`), never a retry traceback."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = ['RemoteError', 'download', 'download_tree', 'is_remote', 'join', 'list_keys', 'local_copy', 'read_json',
           'upload_file', 'upload_tree']


class RemoteError(OSError):
    """An object store that cannot be reached, or an object it does not hold (the message names it)."""


def is_remote(path: str | os.PathLike) -> bool:
    """`scheme://...` other than `file://` (a Windows drive letter is not a scheme)."""
    scheme = urlparse(str(path)).scheme
    return len(scheme) > 1 and scheme != 'file'


def join(uri: str, *parts: str) -> str:
    return '/'.join([uri.rstrip('/'), *(p.strip('/') for p in parts if p.strip('/'))])


def _store(uri: str) -> tuple[Any, str]:
    """Composer's object store for `uri`'s bucket, and the key `uri` names in it."""
    parsed = urlparse(uri)
    try:
        store = _bucket(parsed.scheme, parsed.netloc, os.environ.get('S3_ENDPOINT_URL'))
    except Exception as e:  # missing credentials or client library: one line naming the URI
        raise RemoteError(f'{uri}: cannot open the object store ({e.__class__.__name__}: {e})') from None
    return store, parsed.path.lstrip('/')


@functools.lru_cache(maxsize=8)
def _bucket(scheme: str, bucket: str, endpoint: str | None) -> Any:
    """One client per bucket and endpoint (making one costs a fraction of a second)."""
    from composer.utils import maybe_create_object_store_from_uri
    return maybe_create_object_store_from_uri(f'{scheme}://{bucket}/')


def _fail(uri: str, what: str, e: Exception) -> RemoteError:
    msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
    return RemoteError(f'{uri}: cannot {what} ({msg})')


def download(uri: str, path: str | os.PathLike) -> bool:
    """Copy one object to `path` (written under a temporary name by the store); False if there is no such
    object, `RemoteError` if the store cannot be reached."""
    store, key = _store(uri)
    try:
        store.download_object(key, str(path), overwrite=True)
    except FileNotFoundError as e:  # Composer reports S3's 403 (access denied) as not found, too
        code = str(getattr(e.__cause__, 'response', {}).get('Error', {}).get('Code', ''))
        if code in ('403', 'AccessDenied', 'Forbidden'):
            raise RemoteError(f'{uri}: access denied (check the credentials)') from None
        return False
    except Exception as e:
        raise _fail(uri, 'download', e) from None
    return True


def read_json(uri: str) -> Any | None:
    """The JSON object at `uri`, None if there is none (or it is not JSON)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, 'object')
        if not download(uri, path):
            return None
        try:
            return json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            return None


def list_keys(uri: str) -> list[str]:
    """Keys under `uri/`, relative to it."""
    store, key = _store(uri)
    prefix = key.rstrip('/') + '/' if key else ''
    try:
        keys = store.list_objects(prefix)
    except Exception as e:
        raise _fail(uri, 'list', e) from None
    return sorted(k[len(prefix):] for k in keys if k.startswith(prefix))


def upload_file(path: str | os.PathLike, uri: str) -> None:
    store, key = _store(uri)
    try:
        store.upload_object(key, str(path))
    except Exception as e:
        raise _fail(uri, 'upload', e) from None


def files_under(folder: Path) -> Iterator[Path]:
    return (p for p in sorted(folder.rglob('*')) if p.is_file())


def upload_tree(folder: str | os.PathLike, uri: str, progress: bool = True) -> None:
    """Upload every file under `folder` to the same relative key under `uri`."""
    from tqdm import tqdm
    folder = Path(folder)
    files = list(files_under(folder))
    for p in tqdm(files, desc=f'upload to {uri}', unit='file', disable=not progress):
        upload_file(p, join(uri, p.relative_to(folder).as_posix()))


def download_tree(uri: str, folder: str | os.PathLike, keys: list[str] | None = None) -> list[str]:
    """Download `keys` (relative to `uri`; default: all under it) into `folder`; returns the keys that were
    missing."""
    missing = []
    for k in list_keys(uri) if keys is None else keys:
        if not download(join(uri, k), Path(folder, k)):
            missing.append(k)
    return missing


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A temporary local copy of the object at `uri`, or of every object under it (a folder, such as a sharded
    checkpoint). A Composer `.symlink` object (what `save_latest_filename` uploads) is followed.

    Example:
        >>> with local_copy('s3://bucket/run/latest-rank0.pt.symlink') as path:
        ...     state = torch.load(path)
    """
    if uri.endswith('.symlink'):
        with tempfile.TemporaryDirectory() as tmp:
            if not download(uri, Path(tmp, 'link')):
                raise RemoteError(f'{uri}: no such object')
            target = Path(tmp, 'link').read_bytes().decode('utf-8', 'replace').strip()
        if not target or '\ufffd' in target:
            raise RemoteError(f'{uri}: not a link (empty, or not text)')
        parsed = urlparse(uri)
        uri = target if is_remote(target) else f'{parsed.scheme}://{parsed.netloc}/{target.lstrip("/")}'
    with tempfile.TemporaryDirectory(prefix='composer_shear_remote_') as tmp:
        path = Path(tmp, uri.rstrip('/').rsplit('/', 1)[-1])
        if not download(uri, path):
            keys = list_keys(uri)
            if not keys:
                raise RemoteError(f'{uri}: no such object or prefix')
            download_tree(uri, path, keys)
        yield path
