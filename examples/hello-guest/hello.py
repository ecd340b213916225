#!/usr/bin/python3
"""A small guest program: greets, reports what it runs on, and fails on request.

    hello.py NAME            prints "hello, NAME" and the kernel release; exit 0
    hello.py --fail N        prints an error on stderr; exit N
    hello.py --sum           sums the integers on stdin
"""

import os
import sys


def main(argv: list[str]) -> int:
    if argv[:1] == ["--fail"]:
        print("hello: failing on request", file=sys.stderr)
        return int(argv[1])
    if argv[:1] == ["--sum"]:
        print(sum(int(word) for word in sys.stdin.read().split()))
        return 0
    name = argv[0] if argv else os.environ.get("HELLO_NAME", "world")
    print(f"hello, {name}")
    print(f"kernel: {os.uname().release}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
