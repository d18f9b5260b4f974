"""`meshctl publish-image` and `meshctl images`.

publish-image reads the image here (meshctl runs on the node's host, as `publish` assumes),
verifies every blob, stages the image release's tree (blobs/sha256/*, oci/image.json) in a
temporary directory the daemon can read, publishes it through POST /v1/releases like `publish`,
then removes the staged tree.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from meshd.cli.output import print_json, table


class ApiClient(Protocol):
    def get(self, path: str) -> Any: ...


@contextlib.contextmanager
def staged_image(args: argparse.Namespace) -> Iterator[Path]:
    """The verified image release tree of args.source, removed afterwards.

    Raises meshd.errors.IntegrityError (ImageSourceError) for an image that cannot be published.
    """
    from meshd.registry.source import stage_image  # not at meshctl's start: msgspec, orjson

    base = tempfile.mkdtemp(prefix="meshd-image-", dir=args.stage_dir)
    try:
        # The daemon may run as another user and reads the tree; an image's blobs are not secret.
        os.chmod(base, 0o755)  # noqa: S103
        tree = Path(base) / "image"
        tree.mkdir()
        staged = stage_image(
            args.source,
            tree,
            args.repo or args.name,
            tags=args.image_tag,
            default_tag=args.version,
        )
        for root, dirs, files in os.walk(tree):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)  # noqa: S103
            for f in files:
                path = os.path.join(root, f)
                if os.stat(path).st_nlink == 1:  # a copy of ours (a hard link keeps its source's mode)
                    os.chmod(path, 0o644)
        tags = ", ".join(f"{staged.index.repository}:{t}" for t in sorted(staged.index.tags))
        if not args.json:
            print(
                f"image {tags}: {staged.blobs} blobs, {staged.size} bytes, digests verified", file=sys.stderr
            )
        yield tree
    finally:
        shutil.rmtree(base, ignore_errors=True)


def cmd_publish_image(
    c: Any,
    args: argparse.Namespace,
    publish: Callable[[Any, argparse.Namespace], int],
    error: type[Exception],
) -> int:
    from meshd.errors import IntegrityError

    try:
        with staged_image(args) as tree:
            args.path = str(tree)
            args.origin_dir, args.origin_url = None, []
            return publish(c, args)
    except IntegrityError as e:
        raise error(f"cannot publish image {args.source}: {e}") from None
    except OSError as e:
        raise error(f"cannot publish image {args.source}: {e.strerror or e}") from None


def cmd_images(c: ApiClient, args: argparse.Namespace) -> int:
    doc = c.get("/v1/images")
    if args.json:
        print_json(doc)
        return 0
    rows = []
    for r in doc.get("images", []):
        sites = ", ".join(f"{s}:{n}" for s, n in r.get("sites", {}).items())
        rows.append(
            [
                f"{r['repository']}:{r['tag']}",
                r["digest"][:19],
                str(r["size"]),
                f"{r['release']} {r['version']}",
                "yes" if r.get("serving") else "",
                sites,
            ]
        )
    print(f"node {doc.get('node', '?')} (site {doc.get('site', '?')})")
    print(table(rows, ["IMAGE", "DIGEST", "SIZE", "RELEASE", "SERVED", "COMPLETE ON (SITE:NODES)"]))
    caches = doc.get("caches", [])
    if caches:
        print("\npull-through caches:")
        cache_rows = [[c["site"], c["node"], str(c["blobs"]), str(c["bytes"])] for c in caches]
        print(table(cache_rows, ["SITE", "NODE", "BLOBS", "BYTES"]))
    return 0


def add_publish_image_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="OCI layout directory, oci-archive tar (skopeo copy ... oci-archive:x.tar) or `docker save` tar",
    )
    p.add_argument("--repo", help="repository name the image is served under (default: the release name)")
    p.add_argument(
        "--image-tag",
        action="append",
        default=[],
        metavar="TAG",
        help="tag to serve it as; repeatable (default: the layout's ref names, else the version)",
    )
    p.add_argument("--stage-dir", metavar="DIR", help="where to stage the image tree (default: $TMPDIR)")
