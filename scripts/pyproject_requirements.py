"""Print the third-party requirements of the service's extras, read from the two pyproject.toml files
alone (no code needed): Dockerfile.gpu installs them in a layer before the code is copied, so a code
change never rebuilds the dependency layers. The repository's own distributions (sdxl-lora-client,
sdxl-lora-service, and extras that name them) are followed, not printed.

    python scripts/pyproject_requirements.py pyproject.toml client/pyproject.toml inference,serve,runpod
"""

from __future__ import annotations

import re
import sys
import tomllib

NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(projects: dict[str, dict], wanted: list[str]) -> list[str]:
    out: list[str] = []
    seen: set = set()

    def add(reqs: list[str]) -> None:
        for req in reqs:
            name, extras = NAME.match(req).groups()
            project = projects.get(normalized(name))
            if project is None:
                if req not in out:
                    out.append(req)
                continue
            if normalized(name) not in seen:
                seen.add(normalized(name))
                add(project.get("dependencies", []))
            for extra in filter(None, (e.strip() for e in (extras or "").split(","))):
                if (normalized(name), extra) not in seen:
                    seen.add((normalized(name), extra))
                    add(project["optional-dependencies"][extra])

    add(wanted)
    return out


def main(root_path: str, client_path: str, extras: str) -> None:
    documents = [tomllib.load(open(path, "rb")) for path in (root_path, client_path)]
    projects = {normalized(doc["project"]["name"]): doc["project"] for doc in documents}
    build = [req for doc in documents for req in doc["build-system"]["requires"]]  # code installs without isolation
    root = documents[0]["project"]["name"]
    print("\n".join(dict.fromkeys(build + requirements(projects, [f"{root}[{extras}]"]))))


if __name__ == "__main__":
    main(*sys.argv[1:4])
