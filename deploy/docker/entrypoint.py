"""The image's entry point, by the official images' convention, and the server's drop of root.

    docker run p3                          python3 /app/server.py
    docker run p3 --port 6000 --model m    arguments that start with '-' are flags for the server
    docker run p3 python3 client.py ...    any other command runs as given

Started as root (the image's default user, so that `docker exec` can write into a grader's bind-mounted
folder whoever owns it), the server becomes the unprivileged `modelserver` user before it starts: it needs
no right of root's. The image runs this with `python3 -I`, so that its sitecustomize leaves it alone.
"""

import os
import pwd
import sys
from pathlib import Path

SERVER_COMMAND = ["python3", "/app/server.py"]
SERVER_USER = "modelserver"


def command_line(arguments: list[str]) -> list[str]:
    """The command to run: the server with `arguments` as its flags, or `arguments` as given."""
    if not arguments or arguments[0].startswith("-"):
        return [*SERVER_COMMAND, *arguments]
    return arguments


def runs_the_server(command: list[str]) -> bool:
    return any(Path(argument).name == "server.py" for argument in command[:3])


def become(user: str) -> None:
    """Drop root for good: no supplementary groups, then the user's group and id."""
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ["HOME"] = entry.pw_dir


def main() -> None:
    command = command_line(sys.argv[1:])
    if os.getuid() == 0 and runs_the_server(command):
        become(SERVER_USER)
    try:
        os.execvp(command[0], command)
    except OSError as error:
        sys.exit(f"error: cannot run {command[0]!r}: {error.strerror}")


if __name__ == "__main__":
    main()
