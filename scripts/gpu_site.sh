# Sourced by scripts/gpu_check.sh and scripts/gpu_distributed.sh: lays out the
# package in $site as pip would, without its dependencies (the machine's torch
# is used) and without building anything there, with the wheels of $wheels (if
# set) beside it, and puts it on PYTHONPATH and PATH; step and end open and
# close a section of the Markdown log.
if [[ -n ${wheels:-} ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
fi
cp -r pyro_iwae "$site/pyro_iwae" && cp -r cli "$site/pyro_iwae_cli"
mkdir -p "$site/bin"
printf '#!/usr/bin/env python3\nfrom pyro_iwae_cli.main import cli\ncli()\n' >"$site/bin/pyro-iwae"
chmod +x "$site/bin/pyro-iwae"
TIMEFORMAT="wall %R s"
export PYTHONPATH=$site PATH=$site/bin:$PATH PYTHONUNBUFFERED=1

step() { echo; echo "### $*"; echo; echo '```text'; }
end() { echo '```'; }
