// The pbxgate widget for Kommo (amoCRM).
//
// - A click on a phone number in Kommo (the "phone" action) asks pbxgate to call it from the
//   user's extension: POST {pbxgate}/kommo/call through $authorizedAjax, which adds Kommo's
//   signed X-Auth-Token. pbxgate learns the user from that token, never from this script.
// - A call card shows the user's ringing and active calls (number, state, duration, a link to
//   the contact), live: a one-time ticket from POST {pbxgate}/kommo/stream (with the token),
//   then Server-Sent Events from GET {pbxgate}/kommo/events?ticket=... A stream that ends or
//   drops is reopened with a new ticket, waiting longer after each failure.
//
// pbxgate's address: the widget setting "pbxgate_url", else the one `pbxgate kommo widget`
// wrote below.
define(['jquery'], function ($) {
  'use strict';

  // Written by `pbxgate kommo widget` (http.public_url).
  var BAKED_URL = '';
  var CARD_ID = 'pbxgate-call-card';
  var RETRY_MIN = 1000;
  var RETRY_MAX = 60000;
  // A card with no news for this long after the stream dropped is cleared (its calls are unknown).
  var STALE_AFTER = 10000;

  var CustomWidget = function () {
    var self = this;
    var source = null;
    var retryTimer = null;
    var staleTimer = null;
    var tickTimer = null;
    var retryIn = RETRY_MIN;
    var card = null;
    var receivedAt = 0;
    var stopped = false;
    var actionAdded = false;
    var toldNoExtension = false;

    var FALLBACK = {
      title: 'Calls', ringing: 'Ringing', talking: 'Talking', in: 'Incoming', out: 'Outgoing',
      internal: 'Internal', contact: 'Contact', calling: 'Calling',
      call_failed: 'The call was not placed',
      no_address: 'The pbxgate widget has no address: set it in the widget\'s settings',
      no_extension: 'You have no extension in pbxgate: ask your administrator',
      unreachable: 'pbxgate is unreachable'
    };

    function text(key) {
      var words = null;
      try {
        words = typeof self.i18n === 'function' ? self.i18n('card') : null;
      } catch (e) {
        words = null;
      }
      return (words && words[key]) || FALLBACK[key] || key;
    }

    function base() {
      var settings = {};
      try {
        settings = (typeof self.get_settings === 'function' && self.get_settings()) || {};
      } catch (e) {
        settings = {};
      }
      var url = String(settings.pbxgate_url || BAKED_URL || '').replace(/^\s+|\s+$/g, '');
      return url.replace(/\/+$/, '');
    }

    function installed() {
      if (typeof self.get_install_status !== 'function') {
        return true;
      }
      return self.get_install_status() === 'installed';
    }

    function notify(message, isError) {
      var n = window.APP && window.APP.notifications;
      var note = { header: 'pbxgate', text: message, date: Math.floor(Date.now() / 1000) };
      try {
        if (isError && n && n.show_message_error) {
          n.show_message_error(note);
        } else if (n && n.show_message) {
          n.show_message(note);
        }
      } catch (e) {
        // Notifications are a courtesy.
      }
      var el = document.getElementById(CARD_ID);
      if (el) {
        el.setAttribute('data-last-notice', message);
      }
    }

    function reason(xhr) {
      var body = xhr && xhr.responseJSON;
      if (!body && xhr && xhr.responseText) {
        try {
          body = JSON.parse(xhr.responseText);
        } catch (e) {
          body = null;
        }
      }
      if (body && body.errorMsg) {
        return body.errorMsg;
      }
      return xhr && xhr.status ? 'HTTP ' + xhr.status : text('unreachable');
    }

    function post(path, data) {
      return self.$authorizedAjax({
        url: base() + path,
        method: 'POST',
        type: 'POST',
        data: data || {},
        dataType: 'json'
      });
    }

    // --- click-to-call ---

    function call(phone) {
      if (!base()) {
        notify(text('no_address'), true);
        return;
      }
      post('/kommo/call', { phone: phone }).then(
        function () {
          notify(text('calling') + ' ' + phone, false);
        },
        function (xhr) {
          notify(text('call_failed') + ': ' + reason(xhr), true);
        }
      );
    }

    // --- the call card ---

    function element() {
      var el = document.getElementById(CARD_ID);
      if (!el) {
        el = document.createElement('div');
        el.id = CARD_ID;
        el.className = 'pbxgate-card';
        el.style.cssText = 'position:fixed;right:16px;bottom:16px;z-index:10000;min-width:280px;' +
          'max-width:420px;background:#fff;border:1px solid #d0d7de;border-radius:8px;' +
          'box-shadow:0 4px 16px rgba(0,0,0,.15);font:13px/1.4 sans-serif;color:#1b2a41;' +
          'padding:8px 12px;display:none';
        document.body.appendChild(el);
      }
      return el;
    }

    function clock(seconds) {
      var s = Math.max(0, Math.floor(seconds));
      var m = Math.floor(s / 60);
      var r = s % 60;
      return m + ':' + (r < 10 ? '0' : '') + r;
    }

    function elapsed() {
      return Math.floor((Date.now() - receivedAt) / 1000);
    }

    function span(className, content) {
      var el = document.createElement('span');
      el.className = className;
      el.style.whiteSpace = 'nowrap';
      el.textContent = content;
      return el;
    }

    function draw() {
      var el = element();
      var calls = (card && card.calls) || [];
      while (el.firstChild) {
        el.removeChild(el.firstChild);
      }
      el.style.display = calls.length ? 'block' : 'none';
      if (!calls.length) {
        return;
      }
      var title = document.createElement('div');
      title.className = 'pbxgate-title';
      title.style.cssText = 'font-weight:600;margin-bottom:4px';
      title.textContent = text('title');
      el.appendChild(title);
      calls.forEach(function (c) {
        var row = document.createElement('div');
        row.className = 'pbxgate-call';
        row.setAttribute('data-id', c.id);
        row.setAttribute('data-state', c.state);
        row.style.cssText = 'display:flex;gap:8px;align-items:baseline;padding:2px 0';
        var phone = span('pbxgate-phone', c.phone);
        phone.style.fontWeight = '600';
        row.appendChild(phone);
        row.appendChild(span('pbxgate-state', text(c.state) + ' · ' + text(c.direction)));
        var duration = span('pbxgate-duration', clock(c.seconds + elapsed()));
        duration.setAttribute('data-seconds', String(c.seconds));
        row.appendChild(duration);
        var link = document.createElement('a');
        link.className = 'pbxgate-contact';
        link.href = c.contact_url;
        link.target = '_top';
        link.textContent = text('contact');
        row.appendChild(link);
        el.appendChild(row);
      });
    }

    function tick() {
      var rows = document.querySelectorAll('#' + CARD_ID + ' .pbxgate-duration');
      for (var i = 0; i < rows.length; i++) {
        var seconds = Number(rows[i].getAttribute('data-seconds')) || 0;
        rows[i].textContent = clock(seconds + elapsed());
      }
    }

    function show(next) {
      card = next;
      receivedAt = Date.now();
      if (staleTimer) {
        clearTimeout(staleTimer);
        staleTimer = null;
      }
      draw();
    }

    // --- the live stream ---

    function later() {
      if (stopped || retryTimer) {
        return;
      }
      retryTimer = setTimeout(function () {
        retryTimer = null;
        connect();
      }, retryIn);
      retryIn = Math.min(retryIn * 2, RETRY_MAX);
    }

    function disconnect() {
      if (source) {
        source.close();
        source = null;
      }
      if (retryTimer) {
        clearTimeout(retryTimer);
        retryTimer = null;
      }
    }

    function connect() {
      if (stopped || source || retryTimer || !installed()) {
        return;
      }
      var url = base();
      if (!url || typeof window.EventSource !== 'function') {
        return;
      }
      post('/kommo/stream').then(
        function (body) {
          if (stopped || source || !body || !body.ticket) {
            if (!stopped && !source) {
              later();
            }
            return;
          }
          var es = new window.EventSource(url + '/kommo/events?ticket=' +
            encodeURIComponent(body.ticket));
          source = es;
          es.addEventListener('card', function (ev) {
            var next;
            try {
              next = JSON.parse(ev.data);
            } catch (e) {
              return;
            }
            retryIn = RETRY_MIN;
            show(next);
          });
          es.onerror = function () {
            // Ended or dropped: its ticket is spent, so a new one is needed.
            es.close();
            if (source === es) {
              source = null;
            }
            if (!staleTimer) {
              staleTimer = setTimeout(function () {
                staleTimer = null;
                show(null);
              }, STALE_AFTER);
            }
            later();
          };
        },
        function (xhr) {
          if (xhr && xhr.status === 409 && !toldNoExtension) {
            toldNoExtension = true;
            notify(text('no_extension') + ' (' + reason(xhr) + ')', true);
          }
          later();
        }
      );
    }

    this.callbacks = {
      render: function () {
        return true;
      },
      init: function () {
        if (!actionAdded && typeof self.add_action === 'function') {
          actionAdded = true;
          self.add_action('phone', function (data) {
            var phone = data && (data.value || data.phone);
            if (phone) {
              call(String(phone));
            }
          });
        }
        stopped = false;
        if (!tickTimer) {
          tickTimer = setInterval(tick, 1000);
        }
        connect();
        return true;
      },
      bind_actions: function () {
        return true;
      },
      settings: function () {
        return true;
      },
      onSave: function () {
        // The address may have changed.
        disconnect();
        retryIn = RETRY_MIN;
        setTimeout(connect, 0);
        return true;
      },
      destroy: function () {
        stopped = true;
        disconnect();
        if (tickTimer) {
          clearInterval(tickTimer);
          tickTimer = null;
        }
        var el = document.getElementById(CARD_ID);
        if (el && el.parentNode) {
          el.parentNode.removeChild(el);
        }
        return true;
      }
    };
    return this;
  };

  return CustomWidget;
});
