#!/usr/bin/env bash
# Install the pinned Claude Code CLI into <repo>/.claude-cli for the e2e tests, unless that exact
# version is already there, and print the path of its `claude` entry point (npm's chatter goes to
# stderr, so `claude=$(tests/e2e/install_claude.sh)` works).
#
# Everything comes from the npm registry: @anthropic-ai/claude-code pulls the native binary in as
# an optional dependency (@anthropic-ai/claude-code-linux-x64 and friends), and its postinstall
# only links that binary over bin/claude.exe; nothing is downloaded from anywhere else.
set -euo pipefail

CLAUDE_CODE_VERSION=2.1.330  # the pin; tests/e2e/conftest.py reads it from this line

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
prefix="$repo/.claude-cli"
claude="$prefix/node_modules/.bin/claude"

installed() {
  # The entry point must run and be the pinned version (a bare stub left by a skipped
  # postinstall exits 1; an older install prints another version).
  [ -x "$claude" ] && [ "$("$claude" --version 2>/dev/null)" = "$CLAUDE_CODE_VERSION (Claude Code)" ]
}

if ! installed; then
  command -v npm >/dev/null 2>&1 || {
    echo "install_claude.sh: npm not found: install Node.js and npm (e.g. apt-get install npm) to run the Claude Code e2e tests" >&2
    exit 1
  }
  echo "installing @anthropic-ai/claude-code@$CLAUDE_CODE_VERSION into $prefix" >&2
  mkdir -p "$prefix"
  # --prefer-online: a cached packument may not know the pin yet. The node engine warning
  # (the package asks for node >= 22) is harmless: the CLI is a native binary, node only runs
  # the postinstall that links it.
  npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error --prefer-online \
    "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" 1>&2
  installed || {
    echo "install_claude.sh: $claude does not report version $CLAUDE_CODE_VERSION after npm install" >&2
    exit 1
  }
fi
echo "$claude"
