"""Reads a TensorBoard log directory with TensorBoard's own loaders and prints JSON.

Usage: read_events.py LOGDIR

Output keys:
  records     {file name: number of events TensorBoard's record reader returns}; a record with
              a bad CRC ends the reading of its file, so a wrong checksum shows up as a short count
  file_versions  the file_version strings found
  scalars     {tag: [[step, f32 bits], ...]}  (the stored float32 as its IEEE-754 bit pattern)
  histograms  {tag: [{step, min, max, num, sum, sum_squares (f64 bit patterns),
                      bucket_count, bucket_limit_count, bucket_sum}, ...]}
  texts       {tag: [[step, [text, ...]], ...]}
  hparams     {experiment: {hparams: {name: type}, metrics: [tag, ...]},
               session_start: {hparams: {name: {"number"|"string"|"bool": value}}},
               session_end: {status: int}}

Floats are passed as bit patterns so that the reader on the other side gets them exactly.
"""

import json
import os
import struct
import sys

from tensorboard.backend.event_processing import event_accumulator, event_file_loader
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util


def f32_bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def f64_bits(x):
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def plugin_content(acc, plugin):
    try:
        return acc.PluginTagToContent(plugin)
    except KeyError:
        return {}


def count_records(logdir):
    counts = {}
    versions = []
    for name in sorted(os.listdir(logdir)):
        if "tfevents" not in name:
            continue
        n = 0
        for event in event_file_loader.EventFileLoader(os.path.join(logdir, name)).Load():
            if event.HasField("file_version"):
                versions.append(event.file_version)
            n += 1
        counts[name] = n
    return counts, versions


def hparam_value(value):
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return {"number": value.number_value}
    if kind == "string_value":
        return {"string": value.string_value}
    if kind == "bool_value":
        return {"bool": value.bool_value}
    return {"other": str(kind)}


def main():
    logdir = sys.argv[1]
    records, versions = count_records(logdir)
    guidance = {
        event_accumulator.COMPRESSED_HISTOGRAMS: 0,
        event_accumulator.IMAGES: 0,
        event_accumulator.AUDIO: 0,
        event_accumulator.SCALARS: 0,
        event_accumulator.HISTOGRAMS: 0,
        event_accumulator.TENSORS: 0,
    }
    acc = event_accumulator.EventAccumulator(logdir, size_guidance=guidance)
    acc.Reload()
    tags = acc.Tags()

    scalars = {
        tag: [[e.step, f32_bits(e.value)] for e in acc.Scalars(tag)] for tag in tags["scalars"]
    }
    histograms = {
        tag: [
            {
                "step": e.step,
                "min": f64_bits(e.histogram_value.min),
                "max": f64_bits(e.histogram_value.max),
                "num": f64_bits(e.histogram_value.num),
                "sum": f64_bits(e.histogram_value.sum),
                "sum_squares": f64_bits(e.histogram_value.sum_squares),
                "bucket_count": len(e.histogram_value.bucket),
                "bucket_sum": sum(e.histogram_value.bucket),
                "bucket_limit_count": len(e.histogram_value.bucket_limit),
            }
            for e in acc.Histograms(tag)
        ]
        for tag in tags["histograms"]
    }

    texts = {}
    for tag in plugin_content(acc, "text"):
        rows = []
        for e in acc.Tensors(tag):
            array = tensor_util.make_ndarray(e.tensor_proto)
            items = array.reshape(-1).tolist()
            rows.append([e.step, [x.decode("utf-8") for x in items]])
        texts[tag] = rows

    hparams = {}
    for tag, content in plugin_content(acc, "hparams").items():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        which = data.WhichOneof("data")
        if which == "experiment":
            hparams["experiment"] = {
                "version": data.version,
                "hparams": {h.name: h.type for h in data.experiment.hparam_infos},
                "metrics": [m.name.tag for m in data.experiment.metric_infos],
                "tag": tag,
            }
        elif which == "session_start_info":
            hparams["session_start"] = {
                "version": data.version,
                "hparams": {
                    k: hparam_value(v) for k, v in data.session_start_info.hparams.items()
                },
                "tag": tag,
            }
        elif which == "session_end_info":
            hparams["session_end"] = {
                "version": data.version,
                "status": data.session_end_info.status,
                "tag": tag,
            }

    json.dump(
        {
            "records": records,
            "file_versions": versions,
            "scalars": scalars,
            "histograms": histograms,
            "texts": texts,
            "hparams": hparams,
        },
        sys.stdout,
        allow_nan=False,
    )


if __name__ == "__main__":
    main()
