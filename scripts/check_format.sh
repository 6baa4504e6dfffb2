#!/usr/bin/env bash
# Checks that every C++/CUDA source under include/, tests/, examples/ and bench/ is formatted
# with the repository's .clang-format by clang-format 14 (Debian 12's `clang-format`), and
# lists the files that are not. Installs clang-format first when it is missing.
#
#   bash scripts/check_format.sh          # check; exit 1 listing the unformatted files
#   bash scripts/check_format.sh --fix    # reformat those files in place instead
#
# Other clang-format versions lay out C++20 requires-clauses differently, so the check insists
# on version 14 (set CLANG_FORMAT to pick a binary). The few constructs version 14 mangles are
# fenced with `// clang-format off` / `// clang-format on` in the sources.
set -euo pipefail
cd "$(dirname "$0")/.."

fix=0
case "${1:-}" in
  "") ;;
  --fix) fix=1 ;;
  *) echo "usage: $0 [--fix]" >&2; exit 2 ;;
esac

if [ -z "${CLANG_FORMAT:-}" ]; then
  if command -v clang-format-14 >/dev/null 2>&1; then
    CLANG_FORMAT=clang-format-14
  else
    command -v clang-format >/dev/null 2>&1 || bash scripts/install_deps.sh clang-format
    CLANG_FORMAT=clang-format
  fi
fi
version=$("$CLANG_FORMAT" --version | head -n 1)
if ! [[ "$version" =~ version\ 14\. ]]; then
  echo "check_format: needs clang-format 14 (found: $version); set CLANG_FORMAT to a clang-format 14 binary" >&2
  exit 2
fi

# tracked files and new ones not yet added (ignored paths such as build directories are not)
mapfile -t files < <(git ls-files --cached --others --exclude-standard -- include tests examples bench |
  grep -E '\.(hpp|cpp|cuh|cu|h)$' | sort -u)
if [ ${#files[@]} -eq 0 ]; then
  echo "check_format: no source files found (is this a git checkout?)" >&2
  exit 2
fi

# one clang-format process per core; each prints the name of a file that is not formatted
mapfile -t bad < <(printf '%s\0' "${files[@]}" |
  xargs -0 -n 8 -P "$(nproc)" sh -c 'for f do [ -f "$f" ] || continue; "$0" --dry-run -Werror "$f" >/dev/null 2>&1 || echo "$f"; done' \
    "$CLANG_FORMAT" | sort)

if [ ${#bad[@]} -eq 0 ]; then
  echo "check_format: ${#files[@]} files formatted ($version)"
  exit 0
fi
if [ "$fix" = 1 ]; then
  "$CLANG_FORMAT" -i "${bad[@]}"
  printf 'check_format: reformatted %s\n' "${bad[@]}"
  exit 0
fi
echo "check_format: ${#bad[@]} of ${#files[@]} files are not formatted (fix: bash scripts/check_format.sh --fix):" >&2
printf '  %s\n' "${bad[@]}" >&2
exit 1
