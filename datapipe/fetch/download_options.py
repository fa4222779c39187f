"""img2dataset's own options on our command line: `make download DOWNLOAD_ARGS="--image_size 256 ..."`.

Any keyword of `img2dataset.download` is accepted under its own name (`--image_size 256`,
`--image-size=256`, `--resize_only_if_bigger` for True), its value converted to the type img2dataset
declares. The dataset preset's values are defaults that these override. A name img2dataset does not
have, a value of the wrong type or outside the choices img2dataset knows, a value img2dataset would take
and then fail on (`--thread_count 0`, `--timeout 0`, `--image_size -5`), and the few options this
command sets itself get an error that says what to write instead, before anything is fetched.
`--encode_format png` alone sets the PNG compression level (the preset's encode_quality is a JPEG
quality); a quality the format cannot take is refused.
"""

import ast
import difflib
import inspect
import os
import typing

# albumentations (imported by img2dataset) asks the network for updates unless told not to.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


class OptionError(SystemExit):
    def __init__(self, message):
        super().__init__(f"error: {message}")


# Options this command sets itself, and what to use instead.
SET_HERE = {
    "url_list": "the url list is URL_LIST=<file> (--url-list)",
    "input_format": "the url list's format comes from its file name (.tsv, .csv, .parquet, optionally .gz/.zst)",
    "output_folder": "the output folder is OUT=<dir> (raw shards go to <OUT>/raw; --out)",
    "output_format": "make shards reads img2dataset's webdataset output, so it is always webdataset",
}
# Names of the url list's columns: ours (--url-col / --caption-col) under img2dataset's names.
COLUMN_OPTIONS = ("url_col", "caption_col")
CHOICES = {
    "resize_mode": ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"),
    "encode_format": ("jpg", "png", "webp"),
    "incremental_mode": ("incremental", "overwrite", "extend"),
    "distributor": ("multiprocessing", "pyspark", "ray"),
    "upscale_interpolation": ("nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4"),
    "downscale_interpolation": ("nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4"),
}
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
# The least value img2dataset can work with: below it, it fails in its workers (a traceback per shard, and no
# images), divides by zero, or waits for ever.
LEAST = {"image_size": 1, "processes_count": 1, "thread_count": 1, "number_sample_per_shard": 1, "subjob_size": 1,
         "oom_shard_count": 1, "retries": 0, "max_shard_retry": 0, "min_image_size": 0, "max_aspect_ratio": 1}
ABOVE_ZERO = ("timeout", "max_image_area")
MAKE_VARIABLES = {"processes_count": "PROCESSES", "thread_count": "THREADS"}
# encode_quality means one thing per encode_format: (lowest, highest, what it is).
ENCODE_QUALITY = {"jpg": (0, 100, "JPEG quality"), "webp": (1, 100, "WebP quality"),
                  "png": (0, 9, "PNG compression level")}
PNG_COMPRESSION = 6  # zlib's (and Pillow's) default level, for --encode_format png without --encode_quality


def img2dataset_parameters():
    """{name: inspect.Parameter} of img2dataset.download, the options it takes."""
    from img2dataset import download  # slow to import: only when there are options to check

    return dict(inspect.signature(download).parameters)


def _convert(name, text, annotation):
    """`text` as the type img2dataset declares for `name`."""
    optional = typing.get_origin(annotation) is typing.Union and type(None) in typing.get_args(annotation)
    if optional:
        if text.lower() == "none":
            return None
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if annotation is bool:
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise OptionError(f"--{name} takes true or false, not {text!r}")
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            raise OptionError(f"--{name} takes a number ({annotation.__name__}), not {text!r}") from None
    if typing.get_origin(annotation) is list:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = [item.strip() for item in text.split(",") if item.strip()]  # a,b,c
        if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
            raise OptionError(f"--{name} takes a list of strings, e.g. '[\"a\", \"b\"]' or a,b; not {text!r}")
        return list(value)
    return text


def parse(tokens, parameters=None):
    """{img2dataset option: value} from command-line tokens such as ['--image_size', '256', '--flag']."""
    parameters = parameters if parameters is not None else img2dataset_parameters()
    options, position = {}, 0
    while position < len(tokens):
        token = tokens[position]
        if not token.startswith("--") or token == "--":
            raise OptionError(f"unexpected argument {token!r}: img2dataset options are --name value")
        name, has_value, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if name not in parameters:
            close = difflib.get_close_matches(name, parameters, n=3)
            hint = f"did you mean {', '.join('--' + match for match in close)}? " if close else ""
            raise OptionError(f"img2dataset has no option --{name}; {hint}its options are: "
                              f"{', '.join(sorted(parameters))}")
        if name in SET_HERE:
            raise OptionError(f"--{name} is set by make download: {SET_HERE[name]}")
        annotation = parameters[name].annotation
        if not has_value:
            following = tokens[position + 1] if position + 1 < len(tokens) else None
            if annotation is bool and (following is None or following.startswith("--")):
                value = "true"  # a bare flag
            elif following is None:
                raise OptionError(f"--{name} needs a value")
            else:
                value, position = following, position + 1
        options[name] = _convert(name, value, annotation)
        if name in CHOICES and options[name] not in CHOICES[name]:
            raise OptionError(f"--{name} {options[name]!r} is not one of img2dataset's choices: "
                              f"{', '.join(CHOICES[name])}")
        position += 1
    return options


def check_values(options):
    """Refuse, before anything is fetched, values img2dataset would take and then fail on. `options`: the
    preset's merged with the user's."""
    for name, value in options.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        where = f" (make's {MAKE_VARIABLES[name]}, or --{name})" if name in MAKE_VARIABLES else ""
        if name in LEAST and value < LEAST[name]:
            raise OptionError(f"--{name} {value} cannot work{where}: img2dataset needs at least {LEAST[name]}")
        if name in ABOVE_ZERO and not value > 0:
            raise OptionError(f"--{name} {value} cannot work: img2dataset needs more than 0")


def fit_encode_quality(options, given):
    """`options` (the preset's overridden by `given`, the user's) with an encode_quality that suits encode_format:
    the preset's JPEG quality becomes PNG_COMPRESSION for png when the user gave no --encode_quality; a quality
    the format cannot take is refused."""
    encode_format, quality = options.get("encode_format", "jpg"), options.get("encode_quality", 95)
    if encode_format == "png" and "encode_quality" not in given:
        return {**options, "encode_quality": PNG_COMPRESSION}
    lowest, highest, meaning = ENCODE_QUALITY[encode_format]
    if not lowest <= quality <= highest:
        raise OptionError(f"--encode_quality {quality} does not suit --encode_format {encode_format}: for "
                          f"{encode_format} it is the {meaning}, {lowest} to {highest}")
    return options
