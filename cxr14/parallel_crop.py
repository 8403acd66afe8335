"""Cropping many PNGs on every core, straight out of their archives (the crop stage's engine, stages/crop.py).

- one reader process per archive streams it (gzip reads only in order) and copies the bytes of the
  wanted PNGs into batches in shared memory: a fixed number of slots, so memory stays bounded;
- decoder processes take the batches, crop and resize each image (crop_png) and write it into its row of
  a memory-mapped .npy. Loose PNG files go to the decoders by path.
Decoding so scales past the number of archives, and the largest archive no longer sets the time.
"""

from __future__ import annotations

import math
import mmap
import multiprocessing
import pickle
import queue
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from isal import isal_zlib
from PIL import Image

from cxr14 import packed_images, progress
from cxr14.images import crop_box, crop_resize, iter_archive, open_image, resize_box
from cxr14.params import StageError
from cxr14.stage import worker_process

# A batch, what a reader hands to a decoder: at most BATCH_IMAGES PNGs (few, so that the decoders finish
# together) and SLOT_BYTES of them (8 NIH PNGs take ~3 MB; a PNG bigger than a slot travels alone, through
# the queue). Slots: per decoder, one batch being decoded and one waiting; per reader, one it is filling (without it,
# 12 readers and 16 decoders share 32 slots), so decoders do not wait on readers.
BATCH_IMAGES = 8
SLOT_BYTES = 8 << 20
SLOTS_PER_DECODER = 2


def crop_png(png: bytes, fraction: float, size: int) -> np.ndarray:
    """crop_resize of one PNG file's bytes: the same pixels, sooner. An 8-bit gray PNG (nearly all of NIH's) is
    inflated by ISA-L (zlib's bytes at about twice its speed; the whole stream, so its checksum is checked), and
    Pillow only undoes the row filters of the rows the resize reads (at fraction 0.75, ~12% of the rows are
    never unfiltered): 0.7 of the time of a whole Pillow decode on NIH-like PNGs. Any other PNG, or one that
    ISA-L cannot inflate, is decoded whole by Pillow, so a damaged file gives Pillow's own error."""
    image = open_image(png)  # a 16-bit PNG's sBIT chunk too (to_gray)
    width, height = image.size
    box = crop_box(width, height, fraction)
    codec, _, start, args = image.tile[0] if len(image.tile) == 1 else (None,) * 4
    if (image.format == "PNG" and image.mode == "L" and codec == "zip" and args == "L"
            and "interlace" not in image.info and not getattr(image, "is_animated", False)):
        # The bilinear filter reads up to `scale` rows past the box; resize's reduce() one more.
        rows = min(height, math.ceil(box[3] + 2 * max((box[3] - box[1]) / size, 1)) + 2)
        try:
            stream = _image_data(png, start)
            if not _zlib_header(stream):
                raise ValueError("not a zlib header that zlib accepts")  # ISA-L is laxer
            filtered = memoryview(isal_zlib.decompress(stream))[:(width + 1) * rows]
            top = Image.frombytes("L", (width, rows), _stored(filtered), "zip", "L")
        except (ValueError, struct.error, isal_zlib.error):  # cut short or corrupt: the whole decode below
            pass  # raises Pillow's error
        else:
            if _vertical_first(width, rows, size) != _vertical_first(width, height, size):
                top = top.crop((0, 0, width, height))  # zero rows below, for the whole image's order of passes
            return resize_box(top, box, size)
    image.load()
    return crop_resize(image, fraction, size)


def _zlib_header(stream: bytes) -> bool:
    """Whether a zlib stream starts as zlib requires: deflate, a window of at most 32 KiB, no preset
    dictionary, the check bits right."""
    return (len(stream) >= 2 and stream[0] & 0x0F == 8 and stream[0] >> 4 <= 7 and not stream[1] & 0x20
            and (stream[0] << 8 | stream[1]) % 31 == 0)


def _stored(data: bytes) -> bytes:
    """`data` as a zlib stream of stored (uncompressed) blocks, with no end: Pillow's PNG decoder inflates it at
    the speed of a copy and undoes the PNG row filters, and stops at its last row, before any checksum."""
    view, parts = memoryview(data), [b"\x78\x01"]
    for start in range(0, len(data), 0xFFFF):
        block = view[start:start + 0xFFFF]
        parts += [struct.pack("<BHH", 0, len(block), 0xFFFF ^ len(block)), block]
    return b"".join(parts)


def _vertical_first(width: int, height: int, size: int) -> bool:
    """Whether Pillow's resize to size x size runs its vertical pass before its horizontal one: Pillow 13 does
    when the height shrinks more than twice as much as the width (Resample.c). Rounding between the passes
    depends on the order, so the top rows of a tall image are resized as the whole image would be."""
    return height - size > 0 and height - size > 2 * (width - size)


def _image_data(png: bytes, start: int) -> bytes:
    """A PNG's zlib stream: the data of its consecutive IDAT chunks, the first one's data at `start`."""
    view, parts, position = memoryview(png), [], start - 8
    while True:
        length, kind = struct.unpack_from(">I4s", png, position)  # struct.error past the end: cut short
        if kind != b"IDAT":
            return b"".join(parts)
        if position + 12 + length > len(png):
            raise ValueError("the image data is cut short")
        parts.append(view[position + 8:position + 8 + length])
        position += 12 + length


def _batches(members: Iterable[tuple[str, bytes]]) -> Iterator[list[tuple[str, bytes]]]:
    """(name, PNG bytes) in lists of at most BATCH_IMAGES and SLOT_BYTES (a bigger PNG alone)."""
    batch, used = [], 0
    for name, png in members:
        if batch and (len(batch) == BATCH_IMAGES or used + len(png) > SLOT_BYTES):
            yield batch
            batch, used = [], 0
        batch.append((name, png))
        used += len(png)
    if batch:
        yield batch


def _report(results, error: Exception) -> None:
    """Send a worker's error to the stage; as text if the error itself cannot travel between processes."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        error = StageError(f"{type(error).__name__}: {error}")
    results.put(("error", error))


def _read_archive(path: str, rows: dict[str, int], shared: mmap.mmap, free, batches, results) -> None:
    """Reader process: copy the wanted PNGs of one archive into free slots of `shared`, hand each filled slot
    to the decoders as (slot, [(name, row, (start, length)) or (name, row, PNG bytes)]); report the names."""
    worker_process()  # dies with the stage, even on kill -9
    try:
        names = []
        for batch in _batches(iter_archive(path, set(rows))):
            slot = free.get()  # waits while every slot is taken: memory stays bounded
            entries, start = [], slot * SLOT_BYTES
            for name, png in batch:
                if len(png) > SLOT_BYTES:
                    entries.append((name, rows[name], png))
                else:
                    shared[start:start + len(png)] = png
                    entries.append((name, rows[name], (start, len(png))))
                    start += len(png)
                names.append(name)
            batches.put((slot, entries))
        batches.close()
        batches.join_thread()  # every batch is in the pipe before the stage queues the decoders' stops
        results.put(("read", names))
    except Exception as error:  # an ArchiveError (a truncated archive), ...
        _report(results, error)


def _decode(shared: mmap.mmap, array_path: str, fraction: float, size: int, free, batches, results) -> None:
    """Decoder process: crop each batch's PNGs into their rows of the packed array, until told to stop (None)."""
    worker_process()
    try:
        array = packed_images.open_for_writing(Path(array_path))
        while (batch := batches.get()) is not None:
            slot, entries = batch
            failed = {}
            for name, row, where in entries:
                try:
                    if isinstance(where, tuple):
                        png = shared[where[0]:where[0] + where[1]]
                    else:
                        png = where if isinstance(where, bytes) else Path(where).read_bytes()
                    array[row] = crop_png(png, fraction, size)
                except Exception as error:  # PIL raises many kinds for a broken file
                    failed[name] = f"{type(error).__name__}: {error}"
            if slot is not None:
                free.put(slot)
            results.put(("decoded", len(entries), failed))
        del array  # no msync: the rows are in the page cache, which every reader of the file sees, also after a
        results.put(("done",))  # crash of this process; forcing them to disk held 16 decoders up at the end
    except Exception as error:  # an OSError writing the array, ...
        _report(results, error)


def _next_message(results, processes: list) -> tuple:
    """The next report of a worker; a worker killed (out of memory, a crashing decoder) is an error, not a hang."""
    while True:
        for process in processes:
            if process.exitcode not in (None, 0):
                raise StageError(f"a crop worker process ({process.name}) died: out of memory? Set "
                                 "crop.workers lower and run again")
        try:
            return results.get(timeout=0.1)
        except queue.Empty:
            pass


def slot_count(workers: int, readers: int) -> int:
    return SLOTS_PER_DECODER * workers + readers


def crop_sources(sources: pd.DataFrame, rows: dict[str, int], array_path: Path, fraction: float, size: int,
                 workers: int, bar: progress.Progress) -> tuple[Counter, dict[str, str]]:
    """Crop the wanted images (`rows`: name -> row) of `sources` into the packed array at `array_path`, with a
    reader per archive and `workers` decoders. Return how often each name was found, and the unreadable
    names with why."""
    context = multiprocessing.get_context("fork")  # the workers inherit the shared slots
    archives = list(sources.loc[sources["kind"] == "tar", "path"])
    slots = slot_count(workers, len(archives))
    shared = mmap.mmap(-1, slots * SLOT_BYTES)  # anonymous: the kernel frees it with the last process
    free, batches, results = context.Queue(), context.Queue(), context.Queue()
    decoders = [context.Process(target=_decode, args=(shared, str(array_path), fraction, size, free, batches,
                                                      results), name=f"decoder {i + 1}", daemon=True)
                for i in range(workers)]
    readers = [context.Process(target=_read_archive, args=(path, rows, shared, free, batches, results),
                               name=f"reader of {path}", daemon=True) for path in archives]
    loose = [(row.image, rows[row.image], row.path) for row in sources[sources["kind"] == "png"].itertuples()
             if row.image in rows]
    seen = Counter(name for name, _, _ in loose)
    failed: dict[str, str] = {}
    processes = decoders + readers
    try:
        for process in processes:  # before the progress bar's thread starts: fork copies no threads
            process.start()
        for shared_queue in (free, batches):
            shared_queue.cancel_join_thread()  # the stage's exit never waits on workers killed mid-read
        for slot in range(slots):
            free.put(slot)
        for i in range(0, len(loose), BATCH_IMAGES):
            batches.put((None, loose[i:i + BATCH_IMAGES]))
        if not readers:
            for _ in decoders:
                batches.put(None)
        reading, decoding = len(readers), len(decoders)
        with bar:
            task = bar.add_task(f"crop {fraction:g} -> {size}px ({workers} decoders, {len(readers)} archive "
                                "readers)", total=len(rows))
            while decoding:
                kind, *message = _next_message(results, processes)
                if kind == "decoded":
                    bar.advance(task, message[0])
                    failed.update(message[1])
                elif kind == "read":
                    seen.update(message[0])
                    reading -= 1
                    if not reading:  # every batch is queued: a stop for each decoder, behind them
                        for _ in decoders:
                            batches.put(None)
                elif kind == "done":
                    decoding -= 1
                else:
                    raise message[0]
            bar.update(task, completed=len(rows))
    finally:
        started = [process for process in processes if process.pid]
        for process in started:  # at once: on an error, Ctrl-C or SIGTERM a worker would finish its archive
            if process.is_alive():
                process.kill()
        for process in started:
            process.join()
        shared.close()
    return seen, failed
