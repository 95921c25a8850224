# mailpolicy first boot (image/smartos/README.md). zoneinit sources this file with bash, as
# root, once, at the zone's first boot, and provides log(). It
# 1. mounts the delegated dataset at /srv/mail (the seed's layout),
# 2. runs `mailpolicy provision`, which reads the customer_metadata with mdata-get (the seed's
#    keys: dovecot:*, exim:*, system:*, backup:*, boto:*) and writes every configuration; bad
#    metadata stops the first boot here, with provision's message in the zoneinit log,
# 3. enables the SMF services: the policy daemon first, then the pkgsrc services found.
# MAILPOLICY_HOME (default /opt/mailpolicy) is for tests.

if ! type log >/dev/null 2>&1; then
    log() { printf '%s\n' "$*"; }
fi

mailpolicy_home=${MAILPOLICY_HOME:-/opt/mailpolicy}
mailpolicy_data="zones/$(zonename)/data"

if zfs list -H -o name "${mailpolicy_data}" >/dev/null 2>&1; then
    if [ "$(zfs get -H -o value mountpoint "${mailpolicy_data}")" != /srv/mail ]; then
        log "mounting the delegated dataset ${mailpolicy_data} at /srv/mail"
        zfs set mountpoint=/srv/mail "${mailpolicy_data}"
    fi
else
    log "no delegated dataset ${mailpolicy_data}: /srv/mail stays on the zone's own disk"
fi

log "provisioning mailpolicy from the zone's metadata"
# pkgsrc's exim, dovecot, clamd and spamd are under /opt/local.
if ! PATH="/opt/local/sbin:/opt/local/bin:${PATH}" \
    "${mailpolicy_home}/.venv/bin/mailpolicy" provision --root /srv/mail --etc /etc; then
    log "mailpolicy provision failed: no mail service is enabled"
    exit 1
fi

# The pkgsrc packages bring their own SMF manifests; names differ between pkgsrc releases, so
# each is looked up first (README.md: known work left).
for mailpolicy_fmri in svc:/application/mailpolicy:default \
    pkgsrc/dovecot pkgsrc/exim pkgsrc/clamav pkgsrc/clamd pkgsrc/freshclamd pkgsrc/spamd; do
    if svcs -H -o fmri "${mailpolicy_fmri}" >/dev/null 2>&1; then
        log "enabling ${mailpolicy_fmri}"
        svcadm enable -r "${mailpolicy_fmri}"
    else
        log "no SMF service ${mailpolicy_fmri}: not enabled"
    fi
done
unset mailpolicy_home mailpolicy_data mailpolicy_fmri
