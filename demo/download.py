"""`make download` for the built-in demo set: generate it, serve it on 127.0.0.1 and download it.

    python -m demo.download                       # 3,000 pairs into shards/demo/raw
    python -m demo.download --demo-size 200 --out /tmp/demo/raw --image_size 128

Takes datapipe.fetch.download's options (and img2dataset's, by their own names) besides its own; the url
list is the one it writes, in CC3M's format, for the server it starts.
"""

from pathlib import Path

import demo.dataset
import demo.server
from datapipe.fetch import download


def download_demo(out, demo_root=None, demo_size=3000, **download_keywords):
    """datapipe.fetch.download.download_dataset on the demo set; returns its (totals, failures_by_reason).
    demo_root: where the demo set is generated (default: `source/` beside the raw folder, or beside the staging
    folder's raw/ when `out` is in object storage)."""
    staging = download_keywords.get("staging")
    remote = download.check_remote_output(out, staging) is not None  # before the demo set is generated
    local_raw = Path(staging) / "raw" if remote else Path(out)
    demo_root = Path(demo_root) if demo_root else local_raw.parent / "source"
    items = demo.dataset.ensure_generated(demo_root, num_train=demo_size)
    with demo.server.serve(demo_root / "www") as base_url:
        url_list = demo.server.write_url_list(items, base_url, local_raw.parent / "demo_urls.tsv")
        print(f"demo: serving {len(items)} entries at {base_url}")
        # The server's port changes from run to run: the list's fingerprint leaves its address out.
        return download.download_dataset("demo", out, url_list, fingerprint_ignores=base_url, **download_keywords)


def main(argv=None):
    parser = download.command_parser(__doc__)
    parser.add_argument("--demo-size", type=int, default=3000, help="training pairs in the demo set")
    args, img2dataset_tokens = parser.parse_known_args(argv)
    if args.dataset != "demo" or args.url_list:
        parser.error("this serves the built-in demo set; for a url list use python -m datapipe.fetch.download")
    keywords = download.command_keywords(args, img2dataset_tokens)
    for name in ("dataset", "url_list_path"):
        del keywords[name]
    download_demo(keywords.pop("out"), demo_size=args.demo_size, **keywords)


if __name__ == "__main__":
    main()
