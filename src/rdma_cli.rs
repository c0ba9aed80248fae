//! `livemig rdma devices`: the verbs devices of this host, their ports, link state and GIDs.

use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct RdmaArgs {
    #[command(subcommand)]
    pub command: RdmaCommand,
}

#[derive(Subcommand, Debug)]
pub enum RdmaCommand {
    /// List verbs devices with their ports, link state, MTU and GIDs (what `--rdma-device`
    /// names and `--transport auto` looks at).
    Devices {
        /// Print one JSON array instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[cfg(feature = "rdma")]
pub fn run(a: &RdmaArgs) -> Result<()> {
    use livemig_transport::rdma;
    use serde_json::json;
    use std::net::Ipv6Addr;

    let RdmaCommand::Devices { json } = a.command;
    let devices = rdma::devices()?;
    if json {
        let v: Vec<_> = devices
            .iter()
            .map(|d| {
                json!({
                    "name": d.name,
                    "node_guid": d.node_guid,
                    "ports": d.ports.iter().map(|p| json!({
                        "port": p.port,
                        "state": p.state,
                        "active": p.active,
                        "link_layer": p.link_layer,
                        "active_mtu": p.active_mtu,
                        "lid": p.lid,
                        "gids": p.gids.iter().map(|g| json!({
                            "index": g.index,
                            "gid": Ipv6Addr::from(g.gid).to_string(),
                            "type": g.kind.to_string(),
                            "netdev": g.netdev,
                        })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for d in &devices {
        println!("{}  node GUID {}", d.name, d.node_guid);
        for p in &d.ports {
            println!(
                "  port {}  state {}  link layer {}  active MTU {}{}",
                p.port,
                p.state,
                p.link_layer,
                p.active_mtu,
                if p.link_layer == "InfiniBand" {
                    format!("  LID {}", p.lid)
                } else {
                    String::new()
                }
            );
            for g in &p.gids {
                println!(
                    "    GID {:<3} {:<40} {:<8} {}",
                    g.index,
                    Ipv6Addr::from(g.gid).to_string(),
                    g.kind.to_string(),
                    g.netdev.as_deref().unwrap_or("")
                );
            }
        }
    }
    Ok(())
}

#[cfg(not(feature = "rdma"))]
pub fn run(_: &RdmaArgs) -> Result<()> {
    anyhow::bail!("this livemig was built without RDMA support (cargo feature `rdma`)")
}
