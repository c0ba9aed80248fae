//! The guest's processor on the command line: `run-vm --cpu-model`, `--cpu-without` (also on
//! `receive`), and `livemig cpu`, which shows what a VM started here is given.

use anyhow::{Context, Result};
use clap::Args;
use livemig_engine::vm::kvm::cpu::{self, CpuModel, Feature, GuestCpu, HostCpu};
use serde_json::json;

use crate::one_of;

/// The processor a VM started here gets.
#[derive(Args, Debug, Clone)]
pub struct CpuArgs {
    /// The guest's processor: everything KVM offers here (`host`), or a conservative subset
    /// that x86-64 servers share (`baseline`: x86-64-v2 with XSAVE, NX, SYSCALL; Hyper-V's
    /// processor compatibility), for a VM that moves between unlike hosts of one vendor.
    #[arg(long, default_value_t = CpuModel::Host, value_parser = one_of::<CpuModel>(CpuModel::NAMES))]
    pub cpu_model: CpuModel,
    #[command(flatten)]
    pub without: CpuWithout,
}

/// Features this host offers no guest.
#[derive(Args, Debug, Clone, Default)]
pub struct CpuWithout {
    /// Offer guests this host's processor without FEATURE (its /proc/cpuinfo name, e.g.
    /// avx2), as if it lacked it; repeatable. A VM started here never gets it; an incoming VM
    /// that was given it is refused before any RAM moves.
    #[arg(long = "cpu-without", value_name = "FEATURE")]
    pub features: Vec<String>,
}

impl CpuWithout {
    /// The features, checked.
    pub fn parse(&self) -> Result<Vec<Feature>> {
        self.features
            .iter()
            .map(|f| Feature::parse(f).map_err(anyhow::Error::msg))
            .collect::<Result<_>>()
            .context("--cpu-without")
    }

    /// Sets this process's CPU settings: `model` for a VM started here.
    pub fn apply(&self, model: CpuModel) -> Result<()> {
        cpu::set_host_cpu(HostCpu {
            model,
            without: self.parse()?,
        });
        Ok(())
    }
}

impl CpuArgs {
    /// Sets this process's CPU settings.
    pub fn apply(&self) -> Result<()> {
        self.without.apply(self.cpu_model)
    }
}

/// `livemig cpu`.
#[derive(Args, Debug)]
pub struct CpuCmd {
    #[command(flatten)]
    cpu: CpuArgs,
    /// One JSON object: vendor and model, and the features.
    #[arg(long)]
    json: bool,
}

/// Shows the processor a VM started here with these settings is given.
pub fn show(cmd: &CpuCmd) -> Result<()> {
    let host = HostCpu {
        model: cmd.cpu.cpu_model,
        without: cmd.cpu.without.parse()?,
    };
    let g = GuestCpu::here(&host)?;
    let features = g.features();
    if cmd.json {
        println!(
            "{}",
            json!({
                "model": g.model,
                "processor": g.identity(),
                "features": features,
            })
        );
    } else {
        println!("{} ({} model)", g.identity(), g.model);
        println!("{}", features.join(" "));
    }
    Ok(())
}
