#!/usr/bin/python3
"""Checks that every #include keeps the rule of which room may include which.

usage: scripts/check_rooms.py [REPO]

The rule is the tree in docs/ARCHITECTURE.md between the lines
"<!-- rooms -->" and "<!-- /rooms -->": one line per room,

    NAME/   what it holds   -> ROOM ROOM ...

indented two spaces per level (a sub-room's path is its parent's plus its
own name). A file belongs to the deepest room holding it; it may include
its own room and the rooms after "->" ("X/*" is X and every room under it;
"*" is anything; "(nothing)" is no other room). Include paths are taken
from the repository's root (-I.), ".." folded (one that climbs out is an
error); one without a directory is the file's own. <...> includes whose
first component is a room are checked too; other system headers and
files in no room are not. A room line without its rule is an error. Prints each include that breaks the rule and exits
1 if there is any.
"""
import os
import re
import subprocess
import sys

BEGIN, END = "<!-- rooms -->", "<!-- /rooms -->"
LINE = re.compile(r"^( *)([A-Za-z0-9_.-]+)/\s.*->\s*(.*?)\s*$")
ROOM_LINE = re.compile(r"^( *)([A-Za-z0-9_.-]+)/\s")
INCLUDE = re.compile(r'^\s*#\s*include\s+(?:"([^"]+)"|<([^>]+)>)')
SOURCES = (".c", ".h", ".cu", ".cuh")


def read_rules(doc):
    """{room path: [allowed patterns]}."""
    text = open(doc, encoding="utf-8").read()
    if BEGIN not in text or END not in text:
        sys.exit(f"{doc}: no {BEGIN} ... {END} block")
    rules, stack = {}, []
    for raw in text.split(BEGIN, 1)[1].split(END, 1)[0].splitlines():
        m = LINE.match(raw)
        if not m:
            if ROOM_LINE.match(raw):
                sys.exit(f"{doc}: a room without its rule (\"-> ...\"): {raw.strip()}")
            continue
        stack[len(m.group(1)) // 2:] = [m.group(2)]
        allowed = m.group(3).split()
        rules["/".join(stack)] = [] if allowed == ["(nothing)"] else allowed
    if not rules:
        sys.exit(f"{doc}: the rooms block names no room")
    return rules


def room_of(path, rules):
    parts = path.split("/")[:-1]
    while parts:
        if "/".join(parts) in rules:
            return "/".join(parts)
        parts.pop()
    return None


def allowed(room, target, patterns):
    if target == room:
        return True
    for p in patterns:
        if p in ("*", target) or (p.endswith("/*") and (target == p[:-2] or
                                                        target.startswith(p[:-1]))):
            return True
    return False


def main(repo):
    rules = read_rules(os.path.join(repo, "docs", "ARCHITECTURE.md"))
    # tracked files and new ones not ignored: a file not yet added is checked too
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=repo, stdout=subprocess.PIPE, text=True, check=True).stdout.split()
    bad = 0
    for f in (f for f in files if f.endswith(SOURCES)):
        room = room_of(f, rules)
        if room is None or rules[room] == ["*"]:
            continue
        with open(os.path.join(repo, f), encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                m = INCLUDE.match(line)
                if not m:
                    continue
                inc = m.group(1) or m.group(2)
                if m.group(2) and inc.split("/")[0] not in rules:
                    continue  # a system header (<...> naming no room)
                if "/" not in inc:
                    continue  # the file's own directory
                path = os.path.normpath(inc)
                if path.startswith(".."):
                    print(f"{f}:{n}: {inc}: an include may not climb out with \"..\"")
                    bad += 1
                    continue
                target = room_of(path, rules) or os.path.dirname(path)
                if not allowed(room, target, rules[room]):
                    print(f"{f}:{n}: {room}/ may not include {inc} (it may include: "
                          f"{' '.join(rules[room]) or 'no other room'}; docs/ARCHITECTURE.md)")
                    bad += 1
    print(f"rooms: {len(rules)} rooms, {bad} include(s) breaking the rule")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else
                  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
