#!/usr/bin/env bash
# The web page's test drives Debian's chromium through chromedriver. Install them
# when missing, if this user may (root with apt-get); otherwise say why the test
# will skip. SAGA_REQUIRE_BROWSER=1 (set by .ci/run) makes a missing browser fatal.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing chromium and chromium-driver (Debian) for the web page's test"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null
  exit 0
fi
if [ "${SAGA_REQUIRE_BROWSER:-0}" = 1 ]; then
  echo "chromium and chromedriver are missing and cannot be installed here" >&2
  exit 1
fi
echo "note: no chromium/chromedriver (apt-get install chromium chromium-driver as root):" \
  "the web page's browser test will skip"
