# Inputs of machine-agent.pkr.hcl. Every checksum is required: provision.sh
# refuses an unverified download. Set them with -var or a .pkrvars.hcl file.
# (The checksum validations use regex_replace rather than can(regex(...)):
# the same rule then also runs in Debian's packer 1.6.6, which CI uses.)

variable "region" {
  type        = string
  default     = "us-east-1"
  description = "AWS region the images are built and registered in."
}

variable "image_version" {
  type        = string
  default     = "dev"
  description = "Version in the AMI name and tags, e.g. the agent's release tag."
}

variable "ami_name_prefix" {
  type    = string
  default = "machine-agent"
}

# --- base images: Debian's official bookworm AMIs ---------------------------------

variable "base_ami_owner" {
  type        = string
  default     = "136693071363"
  description = "AWS account of the Debian cloud team's official AMIs."
}

variable "base_ami_name_amd64" {
  type    = string
  default = "debian-12-amd64-*"
}

variable "base_ami_name_arm64" {
  type    = string
  default = "debian-12-arm64-*"
}

variable "ssh_username" {
  type        = string
  default     = "admin"
  description = "The login user of Debian's AMIs."
}

# --- build instances -----------------------------------------------------------------

variable "instance_type_amd64" {
  type    = string
  default = "c7i.large"
}

variable "instance_type_arm64" {
  type    = string
  default = "c7g.large"
}

# --- volumes -----------------------------------------------------------------------------

variable "root_device_name" {
  type        = string
  default     = "/dev/xvda"
  description = "Root device of Debian's AMIs."
}

variable "root_volume_size_gb" {
  type    = number
  default = 20
}

variable "root_volume_type" {
  type    = string
  default = "gp3"
}

variable "root_volume_iops" {
  type        = number
  default     = 3000
  description = "gp3 baseline; the root volume holds only the OS and binaries."
}

variable "root_volume_throughput_mibps" {
  type        = number
  default     = 125
  description = "gp3 baseline, MiB/s."
}

variable "cache_volume_device_name" {
  type        = string
  default     = "/dev/sdf"
  description = "Device name of the BuildKit cache volume in the AMI's block device mapping (Nitro instances show it as an NVMe device, e.g. /dev/nvme1n1)."
}

variable "cache_volume_size_gb" {
  type    = number
  default = 200
}

variable "cache_volume_type" {
  type    = string
  default = "gp3"
}

variable "cache_volume_iops" {
  type        = number
  default     = 3000
  description = "Provisioned IOPS (gp3: 3000..16000)."
}

variable "cache_volume_throughput_mibps" {
  type        = number
  default     = 250
  description = "Provisioned throughput in MiB/s (gp3: 125..1000)."
}

# --- what is installed -----------------------------------------------------------------

variable "repo_root" {
  type        = string
  default     = ""
  description = "The repository whose files are installed; default: the parent of this directory."
}

variable "agent_binary_amd64" {
  type        = string
  default     = "target/x86_64-unknown-linux-gnu/release/machine-agent"
  description = "The amd64 agent, absolute or relative to the repository root (cargo build --release --target x86_64-unknown-linux-gnu)."
}

variable "agent_binary_arm64" {
  type        = string
  default     = "target/aarch64-unknown-linux-gnu/release/machine-agent"
  description = "The arm64 agent, absolute or relative to the repository root (bash .ci/arm64.sh)."
}

variable "config_file" {
  type        = string
  default     = "examples/config-control-plane.toml"
  description = "Installed as /etc/machine-agent/config.toml; relative to the repository root."
}

variable "buildkit_version" {
  type        = string
  default     = "v0.34.2"
  description = "BuildKit release; keep in step with scripts/install-buildkit.sh."
}

variable "buildkit_sha256_amd64" {
  type        = string
  description = "sha256 of buildkit-<version>.linux-amd64.tar.gz."

  validation {
    condition     = length(var.buildkit_sha256_amd64) == 64 && regex_replace(var.buildkit_sha256_amd64, "[0-9a-f]", "") == ""
    error_message = "The buildkit_sha256_amd64 must be a sha256: 64 lowercase hex digits."
  }
}

variable "buildkit_sha256_arm64" {
  type        = string
  description = "sha256 of buildkit-<version>.linux-arm64.tar.gz."

  validation {
    condition     = length(var.buildkit_sha256_arm64) == 64 && regex_replace(var.buildkit_sha256_arm64, "[0-9a-f]", "") == ""
    error_message = "The buildkit_sha256_arm64 must be a sha256: 64 lowercase hex digits."
  }
}

variable "runc_version" {
  type    = string
  default = "v1.3.3"
}

variable "runc_sha256_amd64" {
  type        = string
  description = "sha256 of runc.amd64 of runc_version."

  validation {
    condition     = length(var.runc_sha256_amd64) == 64 && regex_replace(var.runc_sha256_amd64, "[0-9a-f]", "") == ""
    error_message = "The runc_sha256_amd64 must be a sha256: 64 lowercase hex digits."
  }
}

variable "runc_sha256_arm64" {
  type        = string
  description = "sha256 of runc.arm64 of runc_version."

  validation {
    condition     = length(var.runc_sha256_arm64) == 64 && regex_replace(var.runc_sha256_arm64, "[0-9a-f]", "") == ""
    error_message = "The runc_sha256_arm64 must be a sha256: 64 lowercase hex digits."
  }
}
