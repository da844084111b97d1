# Builder VM images for machine-agent, amd64 and arm64, from Debian 12's
# official AMIs. See README.md in this directory:
#
#   packer init packer/
#   packer build -var-file=release.pkrvars.hcl packer/
#
# Both images get the same provisioning (scripts/provision.sh), then an image
# check: the config parses (`machine-agent check`), the unit verifies, and the
# unit is enabled. Paths of local files are relative to the repository root.

locals {
  repo      = var.repo_root != "" ? var.repo_root : "${path.root}/.."
  timestamp = regex_replace(timestamp(), "[- TZ:]", "")
  stage_dir = "/tmp/machine-agent-stage"

  # Per source name: the build instance, base image and artifacts of that arch.
  instance_type = {
    amd64 = var.instance_type_amd64
    arm64 = var.instance_type_arm64
  }
  # An absolute path is taken as it is, a relative one from the repository root.
  agent_binary = {
    amd64 = substr(var.agent_binary_amd64, 0, 1) == "/" ? var.agent_binary_amd64 : "${local.repo}/${var.agent_binary_amd64}"
    arm64 = substr(var.agent_binary_arm64, 0, 1) == "/" ? var.agent_binary_arm64 : "${local.repo}/${var.agent_binary_arm64}"
  }
  buildkit_sha256 = {
    amd64 = var.buildkit_sha256_amd64
    arm64 = var.buildkit_sha256_arm64
  }
  runc_sha256 = {
    amd64 = var.runc_sha256_amd64
    arm64 = var.runc_sha256_arm64
  }

  tags = {
    Name          = "${var.ami_name_prefix}-${var.image_version}"
    image_version = var.image_version
    buildkit      = var.buildkit_version
    runc          = var.runc_version
    base_os       = "debian-12"
  }
}

source "amazon-ebs" "amd64" {
  region        = var.region
  instance_type = local.instance_type.amd64
  ssh_username  = var.ssh_username
  ami_name      = "${var.ami_name_prefix}-${var.image_version}-amd64-${local.timestamp}"
  # IMDSv2 only, as the agent's EC2 identity uses it.
  imds_support = "v2.0"

  source_ami_filter {
    owners      = [var.base_ami_owner]
    most_recent = true
    filters = {
      name                = var.base_ami_name_amd64
      architecture        = "x86_64"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
  }

  launch_block_device_mappings {
    device_name           = var.root_device_name
    volume_size           = var.root_volume_size_gb
    volume_type           = var.root_volume_type
    iops                  = var.root_volume_iops
    throughput            = var.root_volume_throughput_mibps
    delete_on_termination = true
  }

  # The cache volume is part of the image's block device mapping, so every
  # builder launched from it gets one; the agent formats it on first use.
  ami_block_device_mappings {
    device_name           = var.cache_volume_device_name
    volume_size           = var.cache_volume_size_gb
    volume_type           = var.cache_volume_type
    iops                  = var.cache_volume_iops
    throughput            = var.cache_volume_throughput_mibps
    delete_on_termination = true
  }

  tags     = merge(local.tags, { arch = "amd64" })
  run_tags = merge(local.tags, { arch = "amd64" })
}

source "amazon-ebs" "arm64" {
  region        = var.region
  instance_type = local.instance_type.arm64
  ssh_username  = var.ssh_username
  ami_name      = "${var.ami_name_prefix}-${var.image_version}-arm64-${local.timestamp}"
  imds_support  = "v2.0"

  source_ami_filter {
    owners      = [var.base_ami_owner]
    most_recent = true
    filters = {
      name                = var.base_ami_name_arm64
      architecture        = "arm64"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
  }

  launch_block_device_mappings {
    device_name           = var.root_device_name
    volume_size           = var.root_volume_size_gb
    volume_type           = var.root_volume_type
    iops                  = var.root_volume_iops
    throughput            = var.root_volume_throughput_mibps
    delete_on_termination = true
  }

  ami_block_device_mappings {
    device_name           = var.cache_volume_device_name
    volume_size           = var.cache_volume_size_gb
    volume_type           = var.cache_volume_type
    iops                  = var.cache_volume_iops
    throughput            = var.cache_volume_throughput_mibps
    delete_on_termination = true
  }

  tags     = merge(local.tags, { arch = "arm64" })
  run_tags = merge(local.tags, { arch = "arm64" })
}

build {
  sources = ["source.amazon-ebs.amd64", "source.amazon-ebs.arm64"]

  # --- stage: the files provision.sh expects in MA_STAGE_DIR ---------------------------
  provisioner "shell" {
    inline = [
      # First boot: cloud-init may still be configuring apt and the network.
      # Its exit status says "degraded" for harmless warnings; only waiting matters.
      "cloud-init status --wait >/dev/null || true",
      "mkdir -p ${local.stage_dir}",
    ]
  }

  provisioner "file" {
    source      = local.agent_binary[source.name]
    destination = "${local.stage_dir}/machine-agent"
  }

  provisioner "file" {
    source      = "${local.repo}/systemd/machine-agent.service"
    destination = "${local.stage_dir}/machine-agent.service"
  }

  provisioner "file" {
    source      = "${local.repo}/${var.config_file}"
    destination = "${local.stage_dir}/config.toml"
  }

  # --- provision: engine downloads pinned and verified, packages, unit enabled ------------
  provisioner "shell" {
    script          = "${path.root}/scripts/provision.sh"
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} bash {{ .Path }}"
    environment_vars = [
      "MA_STAGE_DIR=${local.stage_dir}",
      "MA_ARCH=${source.name}",
      "BUILDKIT_VERSION=${var.buildkit_version}",
      "BUILDKIT_SHA256=${local.buildkit_sha256[source.name]}",
      "RUNC_VERSION=${var.runc_version}",
      "RUNC_SHA256=${local.runc_sha256[source.name]}",
    ]
  }

  # --- image check: refuse to publish an image whose agent would not start -------------
  provisioner "shell" {
    inline = [
      "set -eu",
      "sudo /usr/local/bin/machine-agent version",
      "sudo /usr/local/bin/machine-agent check --config /etc/machine-agent/config.toml",
      # verify exits 0 on warnings such as an unknown key, so any output fails.
      "out=$(sudo systemd-analyze verify /etc/systemd/system/machine-agent.service 2>&1); if [ -n \"$out\" ]; then echo \"$out\"; exit 1; fi",
      "systemctl is-enabled machine-agent.service",
      "/usr/local/bin/buildkitd --version",
      "/usr/local/bin/runc --version",
      "sudo rm -rf ${local.stage_dir}",
    ]
  }

  post-processor "manifest" {
    output     = "${local.repo}/target/packer-manifest.json"
    strip_path = true
  }
}
