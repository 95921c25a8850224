# Shipped with mailpolicy (dovecot/sieve/after/): runs after the global before-scripts, the
# user's own script and the admin's <root>/dovecot/sieve/after/ scripts.
# Mail SpamAssassin flagged (X-Spam-Flag: YES) goes to the Spam mailbox (special-use \Junk,
# created for every user by dovecot.conf) instead of the INBOX.
require ["fileinto"];

if header :is "X-Spam-Flag" "YES" {
  fileinto "Spam";
  stop;
}
