#!/usr/bin/env python3
"""
A stand-in for the docker client, for tests of docker/build-image.sh: the
images it knows are in the JSON file named by $FAKE_DOCKER_STATE
(C{{"images": {name: {"Id", "Labels", "Size"}}}}), every call is appended to
that file's C{"calls"}, and a build makes (or, with C{"fail_build"} true,
fails to make) the image it tags, with the labels it was given.

Only what build-image.sh asks is answered; anything else fails loudly.
"""

import json
import os
import re
import sys
import uuid


def main(argv):
    path = os.environ["FAKE_DOCKER_STATE"]
    with open(path) as f:
        state = json.load(f)
    state.setdefault("calls", []).append(argv)
    try:
        return answer(state, argv)
    finally:
        with open(path, "w") as f:
            json.dump(state, f)


def answer(state, argv):
    images = state["images"]
    if argv[:1] == ["version"]:
        print("1.41")
        return 0
    if argv[:2] == ["buildx", "version"]:
        return 1
    if argv[:2] == ["image", "inspect"]:
        rest = argv[2:]
        fmt = None
        if rest[:1] == ["--format"]:
            fmt, rest = rest[1], rest[2:]
        (name,) = rest
        image = images.get(name) or next(
            (i for i in images.values() if i["Id"] == name), None)
        if image is None and name in state.get("dangling", []):
            # An image whose tag went to a newer build: no tag names it.
            image = {"Id": name, "Labels": {}, "Size": 1048576}
        if image is None:
            print(f"Error: No such image: {name}", file=sys.stderr)
            return 1
        if fmt is None:
            print(json.dumps([image]))
        elif fmt == "{{.Id}}":
            print(image["Id"])
        elif fmt == "{{.Size}}":
            print(image["Size"])
        elif fmt == "{{len .RepoTags}}":
            print(sum(1 for i in images.values() if i["Id"] == image["Id"]))
        elif m := re.fullmatch(r'\{\{ index \.Config\.Labels "([^"]+)" \}\}', fmt):
            print(image["Labels"].get(m.group(1), ""))
        else:
            raise SystemExit(f"fake docker: unknown format {fmt!r}")
        return 0
    if argv[:1] == ["build"]:
        args, labels, tag = argv[1:], {}, None
        i = 0
        while i < len(args) - 1:
            if args[i] == "--label":
                key, _, value = args[i + 1].partition("=")
                labels[key] = value
            elif args[i] == "-t":
                tag = args[i + 1]
            i += 1
        context = args[-1]
        state.setdefault("contexts", []).append(sorted(os.listdir(context)))
        if state.get("fail_build"):
            print("fake docker: the build failed", file=sys.stderr)
            return 1
        if tag in images and not any(i["Id"] == images[tag]["Id"]
                                     for name, i in images.items() if name != tag):
            state.setdefault("dangling", []).append(images[tag]["Id"])
        images[tag] = {"Id": f"sha256:{uuid.uuid4().hex}", "Labels": labels, "Size": 1048576}
        return 0
    if argv[:2] == ["image", "ls"]:
        return 0
    if argv[:1] == ["rmi"]:
        return 0
    raise SystemExit(f"fake docker: unexpected call {argv!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
