"""Run at the start of every python3 in the image (it lies on PYTHONPATH), for the course's grading procedure.

Graders bind-mount their project folder, `docker exec` a script of theirs in it, and read back what the
script wrote there. Two things make that work whatever the host's versions and user ids:

- The stubs. `import modelserver_pb2` and `modelserver_pb2_grpc` load the image's own copies, generated at
  `docker build` from the same modelserver.proto by the grpcio-tools that matches the image's grpcio and
  protobuf. Copies a grader generated on the host come first on the script's path, but those of another
  grpcio-tools do not import here (protobuf 7 code, or a newer grpcio's version check).
- The owner. A root process whose working directory belongs to another user becomes that user, so that
  what it writes there belongs to the folder's owner on the host, who can change and remove it afterwards.
"""

import importlib.util
import os
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from pathlib import Path

IMAGE_STUBS = Path("/app")
STUB_MODULES = frozenset({"modelserver_pb2", "modelserver_pb2_grpc"})


class ImageStubs(MetaPathFinder):
    """Finds the generated stubs in the image, ahead of any folder on sys.path."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        stub = IMAGE_STUBS / f"{fullname}.py"
        if fullname not in STUB_MODULES or not stub.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, stub)


def become_folder_owner() -> None:
    """As root in a folder owned by someone else, become its owner (and its group) for good."""
    if os.geteuid() != 0:
        return
    try:
        folder = Path.cwd().stat()
    except OSError:
        return
    if folder.st_uid == 0:
        return
    os.setgroups([])
    os.setgid(folder.st_gid)
    os.setuid(folder.st_uid)


sys.meta_path.insert(0, ImageStubs())
become_folder_owner()
