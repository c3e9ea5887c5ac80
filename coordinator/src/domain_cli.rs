//! `ftvm protect --domain` and `ftvm hook`: the CLI's side of protected libvirt domains
//! (`crate::libvirt`; ftvmd's side is `daemon::domains`).

use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::time::Duration;

use crate::daemon::control::{request, request_within, Reply, Request};
use crate::libvirt::{protection_of, Virsh, MAX_XML_BYTES};

/// How long the hook waits for ftvmd: libvirt waits for the hook, and a domain's start
/// with it.
const HOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the hook waits for ftvmd to take news of a stop.
const NEWS_TIMEOUT: Duration = Duration::from_secs(1);

fn ask(socket: &Path, question: &Request) -> Result<String, String> {
    match request(socket, question)? {
        Reply::Done(text) => Ok(text),
        Reply::Error(error) => Err(error),
        _ => Err("unexpected answer from ftvmd".into()),
    }
}

/// `ftvm protect --domain NAME`: reads the domain's XML from libvirt (ftvmd's `[libvirt]
/// uri`), shows what protection changes, asks (unless `yes`), then protects it.
pub fn protect(
    socket: &Path,
    domain: &str,
    level: u8,
    peer: &str,
    yes: bool,
) -> Result<(), String> {
    let Reply::Status(status) = request(socket, &Request::Status)? else {
        return Err("unexpected answer from ftvmd".into());
    };
    let uri = status
        .libvirt_uri
        .ok_or("this ftvmd does not run libvirt domains (too old?)")?;
    let virsh = Virsh::new(&uri);
    if virsh.active(domain)? {
        return Err(format!(
            "domain {domain} is running: shut it down first (virsh shutdown {domain}); ftvmd \
             starts it again, protected"
        ));
    }
    let xml = virsh.dumpxml(domain)?;
    let mut question = Request::ProtectDomain {
        domain: domain.to_owned(),
        xml,
        level,
        peer: peer.to_owned(),
        confirmed: false,
    };
    println!("{}", ask(socket, &question)?);
    if !yes {
        print!("Protect domain {domain}? [y/N] ");
        let _ = std::io::stdout().flush();
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .map_err(|error| format!("cannot read the answer: {error}"))?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err(format!(
                "domain {domain} not protected: nothing was changed"
            ));
        }
    }
    if let Request::ProtectDomain { confirmed, .. } = &mut question {
        *confirmed = true;
    }
    println!("{}", ask(socket, &question)?);
    Ok(())
}

/// `ftvm hook DOMAIN OPERATION …`, run by libvirt with the domain's XML on stdin.
pub fn hook(domain: &str, operation: &str) -> Result<(), String> {
    let mut xml = String::new();
    std::io::stdin()
        .take(MAX_XML_BYTES)
        .read_to_string(&mut xml)
        .map_err(|error| format!("cannot read the domain's XML from stdin: {error}"))?;
    let Some((vm, socket)) = protection_of(&xml) else {
        return Ok(()); // not a domain ftvm protects
    };
    let question = Request::LibvirtHook {
        vm: vm.clone(),
        operation: operation.to_owned(),
    };
    let asks = matches!(operation, "prepare" | "start");
    // News (`stopped`, `release`, …) waits less: libvirt holds the domain meanwhile, and
    // an ftvmd that is stopping (and destroys its domains) no longer answers.
    let timeout = if asks { HOOK_TIMEOUT } else { NEWS_TIMEOUT };
    match request_within(&socket, &question, timeout) {
        Ok(Reply::Error(refusal)) if asks => Err(refusal),
        Err(error) if asks => Err(format!(
            "domain {domain} is protected by ftvm (VM {vm}) and ftvmd cannot say whether it \
             may start on this host: {error}"
        )),
        _ => Ok(()),
    }
}
