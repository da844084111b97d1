#!/usr/bin/env bash
# Checks the deploy artifacts without a cloud account:
#   1. shellcheck on packer/scripts/*.sh and the CI scripts of the deploy issue;
#   2. packer/scripts/test-provision.sh (provision.sh twice into a temp root);
#   3. `packer fmt -check` on packer/, and `packer validate` of the template
#      with Debian's packer, as far as that version can.
#
#   bash .ci/packer-check.sh        # as root on Debian 12
#
# A tool that cannot be installed from Debian is reported loudly and its check
# skipped; a real finding (shellcheck, fmt diff, validate error, provisioning
# not idempotent) fails the script. The summary at the end says what ran.
set -euo pipefail

cd "$(dirname "$0")/.."

step() { printf '\n=== packer-check: %s\n' "$*"; }
banner() {
    printf '\n%s\n' "################################################################################"
    printf '# %s\n' "$@"
    printf '%s\n\n' "################################################################################"
}
checked=()
not_checked=()

# apt_install PACKAGE...: true when installed (now or before); never fails CI.
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -q --no-install-recommends "${missing[@]}" ||
        { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; }; } >/dev/null
}

# --- 1. shellcheck ----------------------------------------------------------------------
step "shellcheck"
scripts=(packer/scripts/*.sh .ci/packer-check.sh .ci/arm64.sh)
if apt_install shellcheck; then
    shellcheck --version | sed -n 2p
    shellcheck "${scripts[@]}"
    checked+=("shellcheck: ${scripts[*]}")
else
    banner "SHELLCHECK NOT RUN: Debian's shellcheck package could not be installed"
    not_checked+=("shellcheck (package not installable)")
fi

# --- 2. provisioning, twice, into a temporary root ------------------------------------------
step "test-provision.sh"
# provision.sh enables the unit with `systemctl --root`.
if command -v systemctl >/dev/null || apt_install systemd; then
    bash packer/scripts/test-provision.sh
    checked+=("provision.sh: installed tree, modes, owners, enable symlink, identical second run, repairs, refusals")
else
    banner "PROVISIONING NOT TESTED: systemctl is missing and Debian's systemd package could not be installed"
    not_checked+=("test-provision.sh (no systemctl)")
fi

# --- 3. packer fmt and validate -----------------------------------------------------------
step "packer"
# Debian 12 ships packer 1.6.6 (the last MPL release before HashiCorp's
# license change; later versions are not in Debian). It formats and parses
# HCL2 and has the amazon builder built in, but predates required_plugins,
# `packer init` and newer amazon plugin arguments.
if ! apt_install packer; then
    banner "PACKER NOT CHECKED: Debian's packer package could not be installed" \
        "(apt-cache policy packer: $(apt-cache policy packer 2>/dev/null | sed -n 's/^ *Candidate: //p'))"
    not_checked+=("packer fmt and validate (package not installable)")
else
    packer_version=$(packer version | sed -n '1s/^Packer v//p')
    echo "packer $packer_version"

    packer fmt -check -diff packer/
    checked+=("packer fmt -check: packer/*.pkr.hcl")

    # Validate a copy without what 1.6.6 cannot read:
    # - plugins.pkr.hcl, the packer { required_plugins } block (needs >= 1.7);
    # - these single-line arguments of the amazon plugin newer than the
    #   builder built into 1.6.6:
    newer_arguments=(imds_support)
    work=$(mktemp -d /tmp/packer-check.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    mkdir "$work/packer"
    cp -r packer/scripts "$work/packer/"
    pattern="^[[:space:]]*($(
        IFS='|'
        echo "${newer_arguments[*]}"
    ))[[:space:]]*="
    removed=()
    for f in packer/*.pkr.hcl; do
        [[ $(basename "$f") == plugins.pkr.hcl ]] && continue
        while IFS=: read -r n line; do removed+=("$(basename "$f"):$n: ${line#"${line%%[![:space:]]*}"}"); done < <(grep -nE "$pattern" "$f" || true)
        grep -vE "$pattern" "$f" >"$work/packer/$(basename "$f")"
    done
    # Placeholder inputs: validation checks that local files exist and that
    # checksums look like sha256, not what they are.
    : >"$work/machine-agent"
    zeros=$(printf '0%.0s' {1..64})
    vars=(-var "repo_root=$PWD" -var "agent_binary_amd64=$work/machine-agent" -var "agent_binary_arm64=$work/machine-agent")
    for v in buildkit_sha256_amd64 buildkit_sha256_arm64 runc_sha256_amd64 runc_sha256_arm64; do
        vars+=(-var "$v=$zeros")
    done
    packer validate "${vars[@]}" "$work/packer"
    echo "packer validate: ok"
    checked+=("packer validate (packer $packer_version, builder configs prepared, file sources found): packer/machine-agent.pkr.hcl, packer/variables.pkr.hcl")
    not_checked+=("plugins.pkr.hcl not loaded: packer $packer_version predates required_plugins and packer init (>= 1.7)")
    for r in "${removed[@]}"; do
        not_checked+=("not validated, newer than packer $packer_version's amazon builder: $r")
    done
    not_checked+=("packer build: needs AWS credentials; the base AMI filter, instance types and downloads are first exercised there")
fi

# --- summary --------------------------------------------------------------------------------
step "summary"
for c in "${checked[@]}"; do echo "checked:     $c"; done
for n in "${not_checked[@]}"; do echo "NOT checked: $n"; done
