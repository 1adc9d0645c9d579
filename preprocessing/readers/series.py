"""Time series from CSV, parquet or Arrow: each numeric column is one series, or, in the long layout of GluonTS and
Hugging Face datasets (GIFT-Eval: one row per series, its values a list in `target`, [time] or [variate][time]), each
row's list is one series per variate; each series is cut into (lookback, horizon) windows.

Splits are by time: the rows are divided into train / val / test ranges by `fractions`, or at the rows
`split_rows` names (the Time-Series-Library's ETT borders: 12 / 4 / 4 months, the rows after them unused); a window
belongs to the split that holds its whole horizon (its lookback may reach back into the previous range, the usual
long-term-forecasting convention, so val/test keep their first windows). Every window carries its series' train-range
mean and std (ddof 0, as that library's StandardScaler), the scale its benchmark tables report errors on."""

import dataclasses
import io
import json
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .. import storage
from .sample import RawSample, Reject, sample_key, unique

SPLITS = ("train", "val", "test")


def read_arrow(data: io.BytesIO) -> pa.Table:
    """Arrow IPC: the stream format Hugging Face's `save_to_disk` writes, or the file (Feather v2) format."""
    try:
        table = pa.ipc.open_stream(data).read_all()
    except pa.ArrowInvalid:
        data.seek(0)
        return pa.ipc.open_file(data).read_all()
    check_stream_end(data.getbuffer())
    return table


STREAM_ENDS = (b"\xff\xff\xff\xff\x00\x00\x00\x00", b"\x00\x00\x00\x00")  # the end-of-stream marker; before Arrow 0.15


def check_stream_end(data) -> None:
    """A stream cut between two of its messages reads as fewer rows without a word (the series shorter, the split
    points moved): its last message must be followed by the end-of-stream marker, as every writer closes it."""
    reader = pa.BufferReader(pa.py_buffer(data))
    while True:
        end = reader.tell()
        try:
            pa.ipc.read_message(reader)
        except EOFError:  # at the marker, or at the end of the bytes
            break
    tail = bytes(data[end:])
    marker = next((m for m in STREAM_ENDS if tail.startswith(m)), None)
    if marker is None:
        raise pa.ArrowInvalid(f"the stream stops after {end} bytes of record batches without its end-of-stream "
                              "marker: the file was cut short")
    if tail[len(marker):].strip(b"\0"):  # zero padding after the marker is harmless
        raise pa.ArrowInvalid(f"{len(tail) - len(marker)} bytes follow the stream's end-of-stream marker")


READERS = {".parquet": pq.read_table, ".csv": pacsv.read_csv, ".arrow": read_arrow}


def load_table(uri: str):
    suffix = posixpath.splitext(uri)[1]
    if suffix not in READERS:
        raise ValueError(f"{uri}: series files must be .csv, .parquet or .arrow")
    data = storage.read_bytes(uri)
    try:
        return READERS[suffix](io.BytesIO(data))
    # a ragged CSV, a file that is not parquet (ArrowInvalid), a damaged page or message (OSError): pyarrow's
    # message names no file
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{uri}: not a readable {suffix[1:]} file: {e}") from None


def fill_gaps(values: np.ndarray) -> np.ndarray:
    """Linear interpolation over NaN/inf runs (ends held at the nearest finite value); with no finite value, the
    values as they are (the window's check rejects them)."""
    finite = np.isfinite(values)
    if not finite.any():
        return values
    idx = np.arange(len(values))
    return np.interp(idx, idx[finite], values[finite])


def split_range(n_rows: int, split: str, fractions, rows=None) -> tuple[int, int]:
    """The split's rows [start, end): at `rows` (each range's end row) when given, else by (train, val, test)
    `fractions` as the Time-Series-Library cuts them: train ends at int(train·n), test starts int(test·n) rows before
    the end, val between (ECL's 26,304 rows: 18,412 and 21,044)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    train, _, test = fractions
    edges = [0, *rows] if rows else [0, int(train * n_rows), n_rows - int(test * n_rows), n_rows]
    i = SPLITS.index(split)
    return int(edges[i]), int(edges[i + 1])


def checked_time_column(table, name: str, uri: str) -> str:
    """The column the rows are sorted by, if it sorts in time order: dates and timestamps (pyarrow parses ISO ones)
    or numbers; text such as 31/01/2020 would sort alphabetically and scramble the series."""
    if name not in table.column_names:
        raise ValueError(f"{uri}: no time column {name!r}; columns: {table.column_names}")
    if table.column_names.count(name) > 1:
        raise ValueError(f"{uri}: the header names the time column {name!r} {table.column_names.count(name)} times")
    kind = table.schema.field(name).type
    if not (pa.types.is_timestamp(kind) or pa.types.is_date(kind) or pa.types.is_integer(kind)
            or pa.types.is_floating(kind)):
        raise ValueError(f"{uri}: time column {name!r} holds {kind} values, which do not sort in time order; give "
                         "ISO dates or times (2020-01-31, 2020-01-31 10:00) or numbers")
    times = table[name]
    # a row without a time has no place in the series: sorted last, its value would end the test split
    timed = pc.is_valid(times)
    if pa.types.is_floating(kind):
        timed = pc.and_(timed, pc.invert(pc.is_nan(pc.fill_null(times, 0.0))))
    missing = len(times) - (pc.sum(timed).as_py() or 0)
    if missing:
        raise ValueError(f"{uri}: time column {name!r} has no time in {missing} of its {len(times)} rows (the first: "
                         f"data row {pc.index(timed, False).as_py() + 1}); give each row its time, or drop those rows")
    return name


def check_distinct_times(times, name: str, uri: str) -> None:
    """Sorted times, each at most once: a time given twice (a clock's fall-back hour, rows appended twice) would
    repeat a step, and every window across it would be a step off."""
    repeated = pc.equal(times.slice(1), times.slice(0, max(len(times) - 1, 0)))
    count = pc.sum(repeated).as_py() or 0
    if count:
        first = times[pc.index(repeated, True).as_py()].as_py()
        raise ValueError(f"{uri}: time column {name!r} gives the time {first} to more than one row ({count} rows "
                         "repeat a time in all); a series has one value a time: drop or merge those rows")


class TooManyWindows(ValueError):
    """More windows than the job may hold: not a bad file (a folder's reading stops, rather than reject it)."""


def read_series(uri: str, lookback: int, horizon: int, stride: int, split: str = "train",
                fractions=(0.7, 0.1, 0.2), columns=None, time_column=None, nan_policy: str = "reject",
                prompt: str = "<series>\nForecast the next values.",
                split_rows=None, max_windows: int | None = None) -> tuple[list[RawSample], list[Reject]]:
    """The windows of one file's series, or of every .csv, .parquet and .arrow file under a folder (GIFT-Eval's
    `<dataset>/<freq>/data-00000-of-00001.arrow` tree, say): keyed by each file's path under it, a file that does not
    read rejected, named, and the others read. More than `max_windows` raise TooManyWindows as soon as they are cut
    (the encode job holds every window: an error now, not the driver out of memory later)."""
    if nan_policy not in ("reject", "interpolate"):
        raise ValueError(f"nan_policy must be 'reject' or 'interpolate', got {nan_policy!r}")
    windows = Windowing(lookback, horizon, stride, split, tuple(fractions), nan_policy, prompt,
                        tuple(split_rows) if split_rows else None, max_windows)
    if storage.exists(uri) or posixpath.splitext(uri)[1] in READERS:
        return file_series(uri, posixpath.splitext(posixpath.basename(uri))[0], windows, columns, time_column)
    try:
        files = dataset_files(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such file or folder") from None
    if not files:
        raise ValueError(f"{uri}: no .csv, .parquet or .arrow file under it")
    samples, rejects = [], []
    stems = [posixpath.splitext(relative)[0] for relative in files]
    for relative, stem in zip(files, stems):
        file = storage.join(uri, relative)
        if stems.count(stem) > 1:  # load.csv beside load.parquet: keyed by their whole names, not one key for both
            stem = relative
        try:
            found, refused = file_series(file, stem,
                                         dataclasses.replace(windows, windows_before=len(samples)), columns,
                                         time_column)
        except TooManyWindows:
            raise
        except ValueError as e:  # unreadable, or a time column out of order
            rejects.append(Reject(file, str(e).removeprefix(f"{file}: ")))
            continue
        samples += found
        rejects += refused
    return unique(samples, rejects), rejects


def dataset_files(uri: str, listed: list[str] | None = None) -> list[str]:
    """The series files under a folder, relative to it. In a folder Hugging Face's `save_to_disk` wrote (its
    state.json lists the data files) the .arrow files it lists, not the `cache-*.arrow` files `datasets` leaves beside
    them, which hold the same rows again (some of GiftEvalPretrain's folders ship one); every file where the
    state.json is some other program's or names a file that is not there. `listed`: the tree's files, when the
    caller has listed them."""
    suffixes = (*READERS, "state.json")
    # one listing of the tree (on S3, a request a 1,000 files)
    walked = sorted(f for f in listed if f.endswith(suffixes)) if listed is not None else storage.walk(uri, suffixes)
    files = [f for f in walked if f.endswith(tuple(READERS))]
    present = {(posixpath.dirname(f), posixpath.basename(f)) for f in files}
    listed = {}
    for state in (f for f in walked if posixpath.basename(f) == "state.json"):
        folder = posixpath.dirname(state)
        try:
            names = {d["filename"] for d in json.loads(storage.read_bytes(storage.join(uri, state)))["_data_files"]}
        except (ValueError, KeyError, TypeError):
            continue
        if all((folder, name) in present for name in names):
            listed[folder] = names
    return [f for f in files if not f.endswith(".arrow") or posixpath.dirname(f) not in listed
            or posixpath.basename(f) in listed[posixpath.dirname(f)]]


def files_read(uri: str) -> dict[str, list[int]] | None:
    """What `read_series` reads of `uri`: each file's [size, modification time in ns], by its name relative to a
    folder ("" for a file; a folder's state.json files too, which choose its .arrow files); None when there is
    nothing there. A found-again entry is checked against it (`preprocessing/cache/resolved.py`)."""
    if storage.is_folder(uri):
        tree = storage.list_tree(uri)
        read = set(dataset_files(uri, list(tree)))
        return {name: list(stat) for name, stat in sorted(tree.items())
                if name in read or posixpath.basename(name) == "state.json"}
    stat = storage.stat_files([uri])[uri]
    return None if stat is None else {"": list(stat)}


def file_series(uri: str, stem: str, windows: "Windowing", columns,
                time_column) -> tuple[list[RawSample], list[Reject]]:
    """One file's windows, keyed under `stem`."""
    table = load_table(uri)
    long_layout = "target" in table.column_names and is_list(table.schema.field("target").type)
    if time_column:
        table = table.sort_by(checked_time_column(table, time_column, uri))
        if not long_layout:  # there a row is a series (its items may share a start), not a time step
            check_distinct_times(table[time_column], time_column, uri)
    # each name once: a column listed twice gave windows with the same keys, which the cache stores once. Dates are
    # no series (the Time-Series-Library's files lead with a `date` column, which cast to numbers is epoch seconds);
    # in the long layout the series are `target`'s (its other lists are covariates)
    names = dict.fromkeys(columns or (["target"] if long_layout else [
        n for n, kind in zip(table.column_names, table.schema.types)
        if n != time_column and not pa.types.is_temporal(kind)]))
    samples, rejects = [], []
    for name in names:
        where = f"{uri}:{name}"
        if name not in table.column_names:
            rejects.append(Reject(where, f"no column {name!r}; columns: {table.column_names}"))
            continue
        if table.column_names.count(name) > 1:  # which of them is meant is anyone's guess
            rejects.append(Reject(where, f"the header names column {name!r} {table.column_names.count(name)} times"))
            continue
        if pa.types.is_temporal(table[name].type):
            rejects.append(Reject(where, f"column {name!r} holds {table[name].type} values: times, not a series"))
            continue
        if is_list(table[name].type):
            items = table["item_id"].to_pylist() if "item_id" in table.column_names else range(table.num_rows)
            for item, cell in zip(items, table[name]):
                series = f"{stem}-{name}-{item}"
                try:
                    variates = row_variates(cell)
                except (TypeError, ValueError, pa.ArrowException):
                    rejects.append(Reject(f"{where}[{item}]", f"row {item}'s {name!r} is not a list of numbers"))
                    continue
                for v, values in enumerate(variates):
                    several = len(variates) > 1
                    windows.cut(values, f"{series}-{v}" if several else series, f"{where}[{item}]",
                                f"row {item}'s {name!r}" + (f", variate {v}," if several else ""),
                                {"column": name, "item": str(item), "variate": v}, samples, rejects)
            continue
        try:
            values = table[name].to_numpy(zero_copy_only=False).astype(np.float64)
        except (TypeError, ValueError):
            rejects.append(Reject(where, f"column {name!r} is not numeric"))
            continue
        windows.cut(values, f"{stem}-{name}", where, "the column", {"column": name}, samples, rejects)
    return unique(samples, rejects), rejects  # a long layout's item_id given twice


def is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def row_variates(cell: pa.Scalar) -> list[np.ndarray]:
    """One long-layout row's series: its list is one ([time]) or one per variate ([variate][time]); nulls are NaN."""
    if not cell.is_valid:
        raise ValueError("null")
    values = cell.values
    if is_list(values.type):
        if values.null_count:
            raise ValueError("a null variate")
        return [np.asarray(v.values.to_numpy(zero_copy_only=False), dtype=np.float64) for v in values]
    return [np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)]


@dataclass(frozen=True)
class Windowing:
    """How a file's series become samples: the split's (lookback, horizon) windows."""

    lookback: int
    horizon: int
    stride: int
    split: str
    fractions: tuple[float, ...]
    nan_policy: str
    prompt: str
    split_rows: tuple[int, int, int] | None = None
    max_windows: int | None = None  # of the job; None: no bound
    windows_before: int = 0  # cut from the files read before this one

    def cut(self, values: np.ndarray, series: str, where: str, what: str, described: dict,
            samples: list[RawSample], rejects: list[Reject]) -> None:
        """One series' windows into `samples`, keyed `<series>-<start>` (`series`: its file's stem, column and
        row), or the reason it has none (`what` names the series to a person) into `rejects`."""
        if not np.isfinite(values).any():
            rejects.append(Reject(where, f"{what} has no finite values"))
            return
        lookback, horizon = self.lookback, self.horizon
        if len(values) < lookback + horizon:
            rejects.append(Reject(where, f"{what} has {len(values)} values, fewer than lookback + horizon = "
                                         f"{lookback + horizon}"))
            return
        if self.split_rows and self.split_rows[-1] > len(values):
            rejects.append(Reject(where, f"{what} has {len(values)} values, fewer than split_rows' last, "
                                         f"{self.split_rows[-1]}"))
            return
        lo, hi = split_range(len(values), self.split, self.fractions, self.split_rows)
        train = values[slice(*split_range(len(values), "train", self.fractions, self.split_rows))]
        train = train[np.isfinite(train)]  # gaps a window's check rejects, not the scale
        scale = {"train_mean": float(train.mean()), "train_std": float(train.std())} if len(train) else {}
        starts = range(max(lo - lookback, 0), hi - lookback - horizon + 1, self.stride)
        if not starts:  # long enough as a whole, too short in this split
            rejects.append(Reject(where, f"{what} has no {self.split} window: its {self.split} values, {lo} to {hi}, "
                                         f"hold no horizon of {horizon} with a lookback of {lookback} before it"))
            return
        if self.max_windows is not None and self.windows_before + len(samples) + len(starts) > self.max_windows:
            raise TooManyWindows(
                f"{where}: with {what}'s {len(starts):,} windows the job would hold more than dataset.max_windows, "
                f"{self.max_windows:,}; the encode job holds every window "
                "until its entry is written (benchmarks/RESULTS.md, 'Series encode'): encode a share of the files "
                "per job (a subfolder), take a larger stride, or raise max_windows where the driver has the memory")
        gaps = np.concatenate([[0], np.cumsum(~np.isfinite(values))])  # a window's gaps in O(1)
        for start in starts:
            window = values[start : start + lookback + horizon]
            if self.nan_policy == "interpolate" and gaps[start + lookback + horizon] > gaps[start]:
                # each part filled from its own values alone: a lookback's gap never from the horizon after it, nor
                # a series' from values of a later split
                window = np.concatenate([fill_gaps(window[:lookback]), fill_gaps(window[lookback:])])
            key_id = f"{series}-{start}"
            meta = {"id": key_id, "turns": [{"role": "user", "text": self.prompt}], **described, "start": start,
                    "split": self.split, "source": where, **scale}
            # views of the series, not copies: a stride-1 test split's windows share its values
            samples.append(RawSample(sample_key(key_id), "series", [], meta,
                                     {"lookback": window[:lookback], "target": window[lookback:]}))
