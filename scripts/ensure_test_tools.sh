#!/usr/bin/env bash
# Debian packages two tests need: chromium and chromium-driver (the web page's
# browser test) and iptables (the separate-hosts test, in network namespaces).
# Install what is missing when this user may (root with apt-get); otherwise say
# which tests will skip. SAGA_REQUIRE_BROWSER=1 / SAGA_REQUIRE_HOSTS=1 (set by
# .ci/run) make a missing tool fatal.
set -euo pipefail
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v iptables >/dev/null || missing+=(iptables)
command -v ip >/dev/null || missing+=(iproute2)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing ${missing[*]} (Debian) for the browser and separate-hosts tests"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
  exit 0
fi
if [ "${SAGA_REQUIRE_BROWSER:-0}" = 1 ] || [ "${SAGA_REQUIRE_HOSTS:-0}" = 1 ]; then
  echo "missing ${missing[*]}, and they cannot be installed here" >&2
  exit 1
fi
echo "note: missing ${missing[*]} (apt-get install as root): the browser or" \
  "separate-hosts test will skip and say why"
