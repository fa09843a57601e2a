"""DynamicStreamingDataset and the `dynamic_text` dataloader: one MDS stream per domain, mixed by proportions
that may change at every interval (one Composer epoch = one interval between re-weightings).

The main process owns the proportions and the domain cursors. When Composer starts an epoch, the loader's
`__iter__` asks the dataset for the next interval's plan (counts per domain, cursors), writes it to a small
file that only this rank's main process writes, and then wakes its (persistent) workers, which read it. The
resume state is O(domains): the interval number, the samples consumed in it, and one cursor per domain.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from composer_shear._io import write_text
from composer_shear._remote import RemoteError, _fail, join
from composer_shear.data.plan import Cursor, Plan, interval_samples, make_plan, worker_slice
from composer_shear.data.prepare import SHARD_HASH, data_location, file_hash, published_build
from composer_shear.data.weights import check_proportions
from composer_shear.errors import ConfigError

if TYPE_CHECKING:
    from composer.core import DataSpec, Evaluator

log = logging.getLogger(__name__)


def _scratch_dir() -> str:
    base = '/dev/shm' if os.path.isdir('/dev/shm') and os.access('/dev/shm', os.W_OK) else None
    path = tempfile.mkdtemp(prefix='composer_shear_plan_', dir=base)
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    return path


def agreed_build(local: str, remote: str | None) -> str | None:
    """`published_build`, read by global rank 0 and shared with every rank (when the data is remote and several
    ranks run), so all ranks read one build even if a new one is published while they start."""
    from composer.utils import dist
    if remote is None or not dist.is_initialized() or dist.get_world_size() == 1:
        return published_build(local, remote)
    found = [published_build(local, remote) if dist.get_global_rank() == 0 else None]
    dist.broadcast_object_list(found, src=0)
    return found[0]


def check_local_split(folder: str, domain: str) -> None:
    """Fail early, naming the file, on a missing or corrupt index, a missing shard, or an empty domain."""
    index = Path(folder, 'index.json')
    if not index.exists():
        raise FileNotFoundError(f'dynamic_text: domain {domain!r} has no MDS data at {folder} '
                                '(no index.json; run composer-shear prepare-data)')
    try:
        shards = json.loads(index.read_text())['shards']
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f'dynamic_text: {index} is corrupt ({e})') from e
    for shard in shards:
        raw = shard.get('raw_data', {}).get('basename')
        zipped = (shard.get('zip_data') or {}).get('basename')
        if not any(b and Path(folder, b).exists() for b in (raw, zipped)):
            raise FileNotFoundError(f'dynamic_text: domain {domain!r}: shard {Path(folder, raw or zipped)} is missing')
        path, size = Path(folder, raw or ''), shard.get('raw_data', {}).get('bytes')
        if raw and path.exists() and path.stat().st_size != size:  # truncated or extended: fail now, not in a worker
            raise ValueError(f'dynamic_text: domain {domain!r}: shard {path} has {path.stat().st_size} bytes, its '
                             f'index says {size} (run composer-shear verify-data)')
    if sum(s.get('samples', 0) for s in shards) == 0:
        raise ValueError(f'dynamic_text: domain {domain!r} is empty ({folder})')


class LocalDomains:
    """Local MDS domain folders read in place: the part of a multi-stream `StreamingDataset`'s interface this
    module uses (global sample ids, domain sizes and offsets, the shard list and its spanner), without the
    shared memory a `StreamingDataset` holds until the process exits."""

    def __init__(self, folders: Iterable[str]) -> None:
        from streaming import LocalDataset
        from streaming.base.spanner import Spanner
        parts = [LocalDataset(f) for f in folders]
        self.samples_per_stream = [p.num_samples for p in parts]
        self.sample_offset_per_stream = np.concatenate([[0], np.cumsum(self.samples_per_stream)[:-1]]).tolist()
        self.shards = [shard for p in parts for shard in p.shards]
        self.spanner = Spanner(np.array([shard.samples for shard in self.shards]))

    def get_item(self, sample_id: int) -> dict:
        shard_id, index = self.spanner[sample_id]
        return self.shards[shard_id][index]


def shard_object(store: Any, shard_id: int) -> tuple[str | None, Path]:
    """The object a shard of a (remote) StreamingDataset is read from, None for local data, and its local file."""
    reader = store.shards[shard_id]
    local = Path(reader.dirname, reader.split, reader.raw_data.basename)
    streams = getattr(store, 'streams', None)
    remote = streams[store.stream_per_shard[shard_id]].remote if streams else None
    return (None if remote is None else join(remote, reader.split, reader.raw_data.basename)), local


def fetch(store: Any, sample_id: int) -> dict:
    """`store.get_item(sample_id)`; a shard that cannot be downloaded is one `RemoteError` naming its object,
    not streaming's retry traceback."""
    try:
        return store.get_item(sample_id)
    except Exception as e:
        shard_id = store.spanner[sample_id][0]
        uri, local = shard_object(store, shard_id)
        if uri is None or local.exists():  # not a download that failed
            raise
        raise _download_failed(store, shard_id, e) from None


def _download_failed(store: Any, shard_id: int, error: Exception) -> RemoteError:
    """Mark a shard whose download failed as not downloaded, and return the error naming it. streaming 0.12 leaves
    it marked as being downloaded, and another worker waiting for it would wait forever: the DataLoader, which
    hands batches out in order, then waits for that worker and never sees the error (the run hangs instead of
    failing)."""
    from streaming.base.dataset import _ShardState
    states = getattr(store, '_shard_states', None)
    if states is not None and states[shard_id] == _ShardState.PREPARING:
        states[shard_id] = _ShardState.REMOTE
    return _fail(shard_object(store, shard_id)[0], 'download', error)


def prefetch(store: Any) -> None:
    """Download every shard of a (small, remote) StreamingDataset now: an eval split is read at every eval, so a
    store that is out of reach fails the run when it starts, not at its first eval."""
    for shard_id in range(store.num_shards):
        try:
            store.prepare_shard(shard_id)
        except Exception as e:
            raise _download_failed(store, shard_id, e) from None


class OneLineErrors:
    """A DataLoader iterator whose worker errors from this module come out as they were raised in the worker
    (one line naming the object or file), not wrapped with the worker's traceback (torch's `Caught ... in
    DataLoader worker process N. Original Traceback ...`)."""

    def __init__(self, iterator: Iterator) -> None:
        self.iterator = iterator

    def __iter__(self) -> OneLineErrors:
        return self

    def __next__(self) -> Any:
        try:
            return next(self.iterator)
        except (RemoteError, ValueError) as e:
            text = str(e)
            if not (text.startswith('Caught ') and '\nOriginal Traceback' in text):
                raise
            kind, _, message = text.rstrip().splitlines()[-1].partition(': ')
            if not (kind.endswith('RemoteError') or message.startswith('dynamic_text: ')):
                raise
            raise type(e)(message) from None

    def __len__(self) -> int:
        return len(self.iterator)


class DynamicStreamingDataset(IterableDataset):
    """Samples of several MDS domains (folders `{local}/{split}/{domain}`, column `tokens`), mixed by proportions.

    Args:
        local: root of the prepared data (or of the cache when `remote` is set).
        domains: domain names, in a fixed order (their index is the domain id in batches).
        proportions: initial proportions (list or dict by domain), non-negative, summing to 1.
        epoch_size: global samples per interval; set it to eval_interval batches x global batch size.
        device_batch_size: samples per device batch.
        remote: optional remote root (anything streaming supports); data is cached under `local`.
        split: `train` or `eval`.
        max_seq_len: tokens per sample (samples are cut to it).
        seed: seed of the per-domain permutations and of the interval shuffles.
        rank, world_size: default to Composer's distributed rank and world size.
    """

    def __init__(self, local: str, domains: Iterable[str], proportions: ArrayLike | dict[str, float],
                 epoch_size: int, device_batch_size: int, max_seq_len: int, remote: str | None = None,
                 split: str = 'train', seed: int = 17, rank: int | None = None, world_size: int | None = None,
                 download_timeout: float = 60) -> None:
        from composer.utils import dist
        from streaming import Stream, StreamingDataset
        self.domains = list(domains)
        if not self.domains:
            raise ConfigError('dynamic_text: dataset.domains is empty')
        self.proportions = check_proportions(proportions, self.domains, 'dataset.proportions')
        self.build = agreed_build(str(local), remote)
        local, remote = data_location(str(local), remote, self.build)
        folders = [os.path.join(local, split, d) for d in self.domains]
        if remote is None:  # local data: read directly, without streaming's shared memory
            for folder, d in zip(folders, self.domains, strict=True):
                check_local_split(folder, d)
            self.store: StreamingDataset | LocalDomains = LocalDomains(folders)
        else:
            streams = [Stream(local=f, remote=join(remote, split, d)) for f, d in zip(folders, self.domains,
                                                                                          strict=True)]
            self.store = StreamingDataset(streams=streams, batch_size=device_batch_size, shuffle=False,
                                          download_timeout=download_timeout)
        self.sizes = [int(n) for n in self.store.samples_per_stream]
        self.offsets = [int(n) for n in self.store.sample_offset_per_stream]
        for d, n in zip(self.domains, self.sizes, strict=True):
            if n == 0:
                raise ValueError(f'dynamic_text: domain {d!r} is empty')
        self.max_seq_len = int(max_seq_len)
        self._checked_shards: set[int] = set()  # per process: shards whose hash _check_shard has verified
        if remote is None:  # every sample of a domain has the length it was prepared at: check one of each
            for d, offset in zip(self.domains, self.offsets, strict=True):
                width = len(self.store.get_item(offset)['tokens'])
                if width != self.max_seq_len:
                    raise ConfigError(f'dynamic_text: dataset.max_seq_len {self.max_seq_len} differs from the '
                                      f'{width} tokens per sample domain {d!r} was prepared with '
                                      f'({os.path.join(local, split, d)}); prepare the data at that length or '
                                      f'set max_seq_len: {width}')
        self.seed = int(seed)
        self.rank = dist.get_global_rank() if rank is None else rank
        self.world = dist.get_world_size() if world_size is None else world_size
        self.batch = int(device_batch_size)
        self.epoch_size = int(epoch_size)
        if self.epoch_size < self.world * self.batch or self.epoch_size % (self.world * self.batch):
            raise ConfigError(f'dynamic_text: dataset.epoch_size {self.epoch_size} must be a positive multiple of '
                             f'the global batch ({self.world} ranks x {self.batch}); use interval batches x '
                             'global batch size')
        self._dir = _scratch_dir()
        self.plan: Plan | None = None
        self._next_epoch, self._next_cursor, self._next_skip = 0, Cursor.start(len(self.domains)), 0
        self._pinned = None  # proportions of an interval resumed mid-way

    # main process ------------------------------------------------------------------------------------------
    def set_proportions(self, proportions: ArrayLike | dict[str, float]) -> None:
        """New proportions; they apply from the next interval."""
        self.proportions = check_proportions(proportions, self.domains, 'proportions')

    def start_interval(self) -> Plan:
        """Plan the next interval and publish it to this rank's workers."""
        proportions = self.proportions if self._pinned is None else self._pinned
        plan, wrapped = make_plan(self._next_epoch, proportions, self._next_cursor, self.epoch_size,
                                  self.sizes, self.seed, skip=self._next_skip)
        self._pinned = None
        for d in sorted(set(wrapped)):
            log.warning('dynamic_text: domain %r ran out of samples (%d) in interval %d; reshuffling it and '
                        'reading it again', self.domains[d], self.sizes[d], plan.epoch)
        write_text(Path(self._dir, 'plan.json'), json.dumps(plan.to_dict()))  # workers never see a partial plan
        self.plan = plan
        self._next_epoch, self._next_cursor, self._next_skip = plan.epoch + 1, plan.end, 0
        return plan

    def __len__(self) -> int:
        """Samples per rank per interval (whole device batches)."""
        return (self.epoch_size // self.world // self.batch) * self.batch

    def peek(self, num_batches: int) -> list[dict]:
        """This rank's first `num_batches` device batches from the start of the current interval (the next one if
        none is planned), collated, without changing what the loader yields. Intervals after it are planned at
        the current proportions (a re-weighting in between would change them). Used to calibrate on the run's
        own first batches (``shear_pruning.init.batches``)."""
        if self.plan is not None:
            epoch, cursor, proportions = self.plan.epoch, self.plan.start, self.plan.proportions
        else:
            epoch, cursor = self._next_epoch, self._next_cursor
            proportions = self.proportions if self._pinned is None else self._pinned
        rows: list = []
        while len(rows) < num_batches * self.batch:
            plan, _ = make_plan(epoch, proportions, cursor, self.epoch_size, self.sizes, self.seed)
            pairs = interval_samples(plan, self.sizes, self.seed, {})
            rows.extend(worker_slice(pairs, 0, self.rank, self.world, 0, 1, self.batch).tolist())
            epoch, cursor, proportions = epoch + 1, plan.end, self.proportions
        return [collate([self.sample(d, i) for d, i in rows[k * self.batch:(k + 1) * self.batch]])
                for k in range(num_batches)]

    def state_dict(self, num_samples: int = 0, from_beginning: bool = True) -> dict:
        """Resume state: interval, global samples consumed in it, cursors at its start, proportions (and the
        build read, for a published remote build)."""
        state = self._position(num_samples)
        return state if self.build is None else {**state, 'build': self.build}

    def _position(self, num_samples: int) -> dict:
        if self.plan is None:  # nothing iterated since construction or a resume
            pinned = self.proportions if self._pinned is None else self._pinned
            return {'epoch': self._next_epoch, 'sample_in_epoch': self._next_skip,
                    'cursor': self._next_cursor.to_dict(), 'proportions': [float(x) for x in pinned]}
        if num_samples == 0:  # Composer has moved past the interval's end (EPOCH_CHECKPOINT)
            return {'epoch': self.plan.epoch + 1, 'sample_in_epoch': 0, 'cursor': self.plan.end.to_dict(),
                    'proportions': self.proportions.tolist()}
        # mid-interval, or its last batch before Composer's EPOCH_END: resume inside the interval (its eval and
        # re-weighting still to come)
        return {'epoch': self.plan.epoch, 'sample_in_epoch': int(num_samples), 'cursor': self.plan.start.to_dict(),
                'proportions': [float(x) for x in self.plan.proportions]}

    def carry_on(self, cursor: dict, epoch: int = 0) -> None:
        """Start where another run over the same data stopped (its `state_dict` at the end): each domain's next
        sample is the one after the last that run read. Call before the first interval."""
        if self.plan is not None:
            raise RuntimeError('dynamic_text: carry_on after the loader has started')
        self._next_cursor, self._next_epoch, self._next_skip, self._pinned = Cursor(**cursor), int(epoch), 0, None

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict`: the next interval starts where the checkpointed one stood."""
        saved = state.get('build')
        if saved is not None and self.build is not None and saved != self.build:
            raise ConfigError(f'dynamic_text: the checkpoint read build {saved} of the data, which now publishes '
                              f'{self.build}; set dataset.remote to the old build\'s prefix ({saved}) to resume '
                              'on the same data')
        self._next_epoch = int(state['epoch'])
        self._next_cursor = Cursor(**state['cursor'])
        self._next_skip = int(state['sample_in_epoch'])
        self.set_proportions(state['proportions'])
        # a mid-interval resume finishes the interval with the proportions it started with
        self._pinned = self.proportions.copy() if self._next_skip else None
        self.plan = None

    # workers -----------------------------------------------------------------------------------------------
    def _current_plan(self) -> Plan:
        path = Path(self._dir, 'plan.json')
        if not path.exists():
            raise RuntimeError('dynamic_text: no interval planned; iterate through the dynamic_text DataLoader')
        return Plan.from_dict(json.loads(path.read_text()))

    def __iter__(self) -> Iterator[dict]:
        plan = self._current_plan()
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if not hasattr(self, '_perms'):
            self._perms = {}  # per worker: the current pass's permutation of each domain
        pairs = interval_samples(plan, self.sizes, self.seed, self._perms)
        for d, i in worker_slice(pairs, plan.skip, self.rank, self.world, worker, workers, self.batch):
            yield self.sample(int(d), int(i))

    def sample(self, domain: int, index: int) -> dict:
        tokens = fetch(self.store, self.offsets[domain] + index)['tokens']
        self._check_shard(self.offsets[domain] + index)
        ids = torch.from_numpy(np.asarray(tokens[:self.max_seq_len]).astype(np.int64))
        return {'input_ids': ids, 'domain': domain}

    def _check_shard(self, sample_id: int) -> None:
        """The first time this process reads a shard, its SHA-1 against the one its index records (prepare-data
        writes them): a corrupt shard fails here, naming its file, instead of yielding wrong tokens."""
        shard_id, _ = self.store.spanner[sample_id]
        if shard_id in self._checked_shards:
            return
        reader = self.store.shards[shard_id]  # the global shard list (of all domains) in both stores
        expected = (reader.raw_data.hashes or {}).get(SHARD_HASH)
        uri, path = shard_object(self.store, shard_id)
        if expected is not None and file_hash(path, SHARD_HASH) != expected:
            if uri is None:
                raise ValueError(f'dynamic_text: shard {path} is corrupt ({SHARD_HASH} differs from its index.json; '
                                 'run composer-shear verify-data, then prepare-data --overwrite)')
            path.unlink(missing_ok=True)  # only a cached copy: the next run downloads it again
            raise ValueError(f'dynamic_text: shard {uri} is corrupt ({SHARD_HASH} of the downloaded copy differs '
                             f'from its index.json; the copy was removed from the cache; run composer-shear '
                             f'verify-data on the store)')
        self._checked_shards.add(shard_id)


def collate(samples: list[dict]) -> dict:
    """input_ids, attention_mask, labels and domain as views of one buffer: workers hand one tensor to the main
    process instead of four (that hand-over, not the bytes, is what costs)."""
    b, t = len(samples), samples[0]['input_ids'].shape[0]
    buf = torch.empty(3 * b * t + b, dtype=torch.int64)
    ids = buf[:b * t].view(b, t)
    torch.stack([s['input_ids'] for s in samples], out=ids)
    buf[b * t:2 * b * t] = 1
    buf[2 * b * t:3 * b * t] = buf[:b * t]
    buf[3 * b * t:] = torch.tensor([s['domain'] for s in samples])
    return {'input_ids': ids, 'attention_mask': buf[b * t:2 * b * t].view(b, t),
            'labels': buf[2 * b * t:3 * b * t].view(b, t), 'domain': buf[3 * b * t:]}


class DynamicLoader(DataLoader):
    """A DataLoader that plans each interval in the main process before its workers start it."""

    def __iter__(self) -> Iterator[dict]:
        self.dataset.start_interval()
        return OneLineErrors(super().__iter__())


def build_dynamic_text_dataloader(tokenizer: Any, device_batch_size: int, dataset: dict, drop_last: bool = True,
                                  num_workers: int = 2, pin_memory: bool = False, prefetch_factor: int | None = 2,
                                  persistent_workers: bool = True, timeout: float = 0) -> DataSpec:
    """llm-foundry dataloader `dynamic_text`: returns a Composer DataSpec."""
    ds = DynamicStreamingDataset(device_batch_size=device_batch_size, **dataset)
    return data_spec(DynamicLoader, ds, device_batch_size, drop_last, num_workers, pin_memory, prefetch_factor,
                     persistent_workers, timeout)


def data_spec(loader_class: type[DataLoader], ds: IterableDataset, device_batch_size: int, drop_last: bool,
              num_workers: int, pin_memory: bool, prefetch_factor: int | None, persistent_workers: bool,
              timeout: float) -> DataSpec:
    """The DataSpec of a loader over `ds` that batches with `collate` (worker-only options dropped without
    workers) and counts the tokens of a batch from its attention mask."""
    from composer.core import DataSpec
    loader = loader_class(ds, batch_size=device_batch_size, collate_fn=collate, drop_last=drop_last,
                          num_workers=num_workers, pin_memory=pin_memory,
                          prefetch_factor=prefetch_factor if num_workers else None,
                          persistent_workers=persistent_workers and num_workers > 0, timeout=timeout)
    return DataSpec(loader, get_num_tokens_in_batch=lambda b: int(b['attention_mask'].sum()))


EVAL_KEYS = ('local', 'domain', 'max_seq_len', 'remote')
EVAL_REQUIRED = EVAL_KEYS[:3]


def build_domain_eval_dataloader(tokenizer: Any, device_batch_size: int, dataset: dict, drop_last: bool = False,
                                 num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int | None = None,
                                 persistent_workers: bool = False, timeout: float = 0) -> DataSpec:
    """llm-foundry dataloader `domain_eval`: one domain's eval split (`{local}/eval/{domain}`), every token a
    target, as `dynamic_text` trains and `composer-shear reference-loss` measures (llm-foundry's `text` loader
    drops the targets equal to the pad token, which is EOS for tokenizers without one). Use it for the
    evaluators `dynamic_loading` reads, so that eval and reference losses are the same measurement.

    Example (YAML):
        eval_loaders:
          - {label: cc, name: domain_eval, dataset: {local: data/rp, domain: cc, max_seq_len: 4096}}
    """
    unknown, missing = sorted(set(dataset) - set(EVAL_KEYS)), [k for k in EVAL_REQUIRED if k not in dataset]
    if unknown or missing:
        raise ConfigError(f'domain_eval: dataset.{(unknown or missing)[0]} is {"unknown" if unknown else "required"}'
                          f'; keys: {", ".join(EVAL_KEYS)}')
    ds = DomainEvalSet(str(dataset['local']), str(dataset['domain']), device_batch_size, int(dataset['max_seq_len']),
                       remote=dataset.get('remote'))
    return data_spec(DataLoader, ds, device_batch_size, drop_last, num_workers, pin_memory, prefetch_factor,
                     persistent_workers, timeout)


class DomainEvalSet(IterableDataset):
    """One domain's eval split (`{local}/eval/{domain}`, or `{remote}/eval/{domain}` cached under `local`),
    partitioned over ranks by streaming."""

    def __init__(self, local: str, domain: str, batch_size: int, max_seq_len: int, domain_id: int = 0,
                 remote: str | None = None) -> None:
        from streaming import StreamingDataset
        local, remote = data_location(str(local), remote, agreed_build(str(local), remote))
        folder = os.path.join(local, 'eval', domain)
        if remote is None:
            check_local_split(folder, domain)
        self.store = StreamingDataset(local=folder, remote=None if remote is None else join(remote, 'eval', domain),
                                      batch_size=batch_size, shuffle=False)
        if remote is not None:
            prefetch(self.store)
        self.max_seq_len, self.domain_id = max_seq_len, domain_id

    def __len__(self) -> int:
        return len(self.store)  # this rank's share

    def __iter__(self) -> Iterator[dict]:
        for s in self.store:
            ids = np.asarray(s['tokens'][:self.max_seq_len]).astype(np.int64)
            yield {'input_ids': torch.from_numpy(ids), 'domain': self.domain_id}


def domain_evaluators(local: str, domains: Iterable[str], batch_size: int, max_seq_len: int,
                      remote: str | None = None) -> list[Evaluator]:
    """Composer Evaluators labelled with the domain names (what `dynamic_loading` reads), LanguageCrossEntropy."""
    from composer.core import Evaluator
    return [Evaluator(label=d, metric_names=['LanguageCrossEntropy'], dataloader=DataLoader(
        DomainEvalSet(local, d, batch_size, max_seq_len, i, remote), batch_size=batch_size, collate_fn=collate))
        for i, d in enumerate(domains)]
